// OpenFeature's stock OFREP web provider (static context: one bulk evaluation, kept
// fresh by the server's event stream), run under Node: no code of ours. A browser gives
// the provider fetch, EventSource and document; Node 18+ has fetch, and the rest is
// given here (EventSource from the `eventsource` package, sending the token as a header).
//   node client.mjs BASE_URL SERVICE [TOKEN]
// prints {"event": NAME, "flags": [...]} per provider event, {"fetch": ...} per bulk
// request (its query, If-None-Match and status), {"event": "INITIALIZED"} once ready,
// and for each stdin line "KIND KEY DEFAULT_JSON" one JSON line with the resolution.
import { createInterface } from 'node:readline';
import { EventSource as NodeEventSource } from 'eventsource';
import { OpenFeature, ProviderEvents } from '@openfeature/web-sdk';
import { OFREPWebProvider } from '@openfeature/ofrep-web-provider';

const [baseUrl, service, token] = process.argv.slice(2);
const say = (doc) => process.stdout.write(JSON.stringify(doc) + '\n');
const auth = token ? { Authorization: `Bearer ${token}` } : {};

globalThis.EventSource = class extends NodeEventSource {
  constructor(url, init) {
    super(url, {
      ...init,
      fetch: (input, options) =>
        fetch(input, { ...options, headers: { ...options?.headers, ...auth } }),
    });
  }
};

const logged = async (input, init) => {
  const response = await fetch(input, init);
  const url = new URL(input.url ?? input);
  say({
    fetch: url.pathname,
    query: Object.fromEntries(url.searchParams),
    if_none_match: input.headers?.get?.('If-None-Match') ?? null,
    status: response.status,
  });
  return response;
};

for (const event of [ProviderEvents.Ready, ProviderEvents.ConfigurationChanged,
                     ProviderEvents.Error, ProviderEvents.Stale]) {
  OpenFeature.addHandler(event, (details) => {
    say({ event: event, flags: [...(details?.flagsChanged ?? [])].sort() });
  });
}

const provider = new OFREPWebProvider({
  baseUrl,
  headers: Object.entries(auth),
  fetchImplementation: logged,
  cacheMode: 'disabled',
  changeDetection: 'sse',
  pollInterval: 0,
});
await OpenFeature.setContext({ targetingKey: 'user-1', service });
await OpenFeature.setProviderAndWait(provider);
say({ event: 'INITIALIZED', flags: [] });
const client = OpenFeature.getClient();
const resolve = {
  boolean: (k, d) => client.getBooleanDetails(k, d),
  string: (k, d) => client.getStringDetails(k, d),
  float: (k, d) => client.getNumberDetails(k, d),
  object: (k, d) => client.getObjectDetails(k, d),
};
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const [kind, key, ...rest] = line.trim().split(' ');
  const details = resolve[kind](key, JSON.parse(rest.join(' ')));
  say({
    value: details.value,
    reason: details.reason ?? null,
    variant: details.variant ?? null,
    error_code: details.errorCode ?? null,
  });
}
await OpenFeature.close();
process.exit(0);
