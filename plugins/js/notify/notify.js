// notify: a jobhost phase written in JavaScript (ComponentizeJS).
//
// Posts the report of an earlier phase (`render-report`'s `{"report": …}`,
// or the last phase's whole output) to a URL, with a bearer token read from
// a secret the operator granted:
//
//   config: {"url": "https://chat.example.com/hooks/reports",
//            "token_secret": "notify_token"}   (the secret's name; optional)
//
// The body is `{"job_id", "phase", "report"}`. The operator grants the URL's
// origin and the secret (`jobhost plugin grant notify --version 1.0.0
// --http https://chat.example.com --secret notify_token`); without them the
// call fails, naming the missing grant. A 5xx or 429 answer is retried, any
// other non-2xx fails the phase.
import { get } from 'wasi:config/store@0.2.0-rc.1';
import { log } from 'jobhost:plugin/host@0.1.0';

const fail = message => ({ tag: 'fail', val: message });
const retry = message => ({ tag: 'retry', val: message });

export const phase = {
  describe() {
    return {
      name: 'notify',
      version: '1.0.0',
      description: 'Posts a report to a URL with a bearer secret (written in JavaScript)',
    };
  },

  async run(ctx, input) {
    const config = JSON.parse(ctx.config);
    if (typeof config.url !== 'string') throw fail('config.url: the URL to post the report to');
    if (input.previous.length === 0) throw fail('notify needs an earlier phase to report on');
    const [phaseName, output] = input.previous[input.previous.length - 1];
    const last = JSON.parse(output);
    const headers = { 'content-type': 'application/json' };
    if (config.token_secret) {
      let token;
      try {
        token = get(config.token_secret);
      } catch (error) {
        throw retry(`reading secret ${config.token_secret}: ${error.payload?.val ?? error}`);
      }
      if (token === undefined) throw fail(`secret ${config.token_secret} has no value`);
      headers.authorization = `Bearer ${token}`;
    }
    const body = JSON.stringify({ job_id: ctx.jobId, phase: phaseName, report: last.report ?? last });
    let response;
    try {
      response = await fetch(config.url, { method: 'POST', headers, body });
    } catch (error) {
      throw retry(`posting to ${config.url}: ${error.message ?? error}`);
    }
    if (!response.ok) {
      const message = `${config.url} answered ${response.status}`;
      throw response.status >= 500 || response.status === 429 ? retry(message) : fail(message);
    }
    log('info', `posted the report of ${phaseName} to ${config.url}`);
    return JSON.stringify({ posted: true, status: response.status });
  },
};
