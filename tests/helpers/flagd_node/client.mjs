// A Node service using OpenFeature's stock flagd provider in in-process mode: no code
// of ours. The same line protocol as tests/helpers/flagd_client.py:
//   node client.mjs HOST PORT SELECTOR
// prints {"event": NAME, "flags": [...]} per provider event and {"event": "INITIALIZED"}
// once ready; for each stdin line "KIND KEY DEFAULT_JSON" one JSON line with the
// resolution (value, reason, variant, error_code).
import { createInterface } from 'node:readline';
import { OpenFeature, ProviderEvents } from '@openfeature/server-sdk';
import { FlagdProvider } from '@openfeature/flagd-provider';

const [host, port, selector] = process.argv.slice(2);
const say = (doc) => process.stdout.write(JSON.stringify(doc) + '\n');

for (const event of [ProviderEvents.Ready, ProviderEvents.ConfigurationChanged,
                     ProviderEvents.Error, ProviderEvents.Stale]) {
  OpenFeature.addHandler(event, (details) => {
    say({ event: event, flags: [...(details?.flagsChanged ?? [])].sort() });
  });
}

const provider = new FlagdProvider({
  resolverType: 'in-process', host, port: Number(port), selector,
  retryBackoffMs: 100, retryBackoffMaxMs: 200, deadlineMs: 5000,
});
await OpenFeature.setProviderAndWait(provider);
say({ event: 'INITIALIZED', flags: [] });
const client = OpenFeature.getClient();
const resolve = {
  boolean: (k, d) => client.getBooleanDetails(k, d),
  string: (k, d) => client.getStringDetails(k, d),
  float: (k, d) => client.getNumberDetails(k, d),
  integer: (k, d) => client.getNumberDetails(k, d),
  object: (k, d) => client.getObjectDetails(k, d),
};
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const [kind, key, ...rest] = line.trim().split(' ');
  const details = await resolve[kind](key, JSON.parse(rest.join(' ')));
  say({
    value: details.value,
    reason: details.reason ?? null,
    variant: details.variant ?? null,
    error_code: details.errorCode ?? null,
  });
}
await OpenFeature.close();
process.exit(0);
