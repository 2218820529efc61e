"""Run every benchmark at its default size: ``python -m benchmarks`` (``make bench``)."""

from benchmarks import bench_writes

if __name__ == "__main__":
    print("== writes ==")
    bench_writes.main([])
