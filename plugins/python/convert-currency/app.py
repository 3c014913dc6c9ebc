"""convert-currency: a jobhost phase written in Python (componentize-py).

Reads the records of the previous phase (as `csv-parse` makes them), converts
each record's amount to one currency with the rates from the config, and
passes the records on in the same shape, so `aggregate` can follow it.

Config: {"rates": {"EUR": 1.08, "GBP": 1.27}, "to": "USD",
         "amount": "amount", "currency": "currency"}
or, instead of "rates", "rates_url": an http(s) URL answering a JSON object
of rates like the one above, fetched through wasi:http. The operator grants
its origin (`jobhost plugin grant convert-currency --version 1.0.0 --http
https://rates.example.com`); without the grant the fetch fails, and so does
the phase, naming it.
A record already in `to` keeps its amount; an unknown currency fails the
phase permanently, naming the record.
"""

import json
from urllib.parse import urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.exports.phase import Error_Fail, Error_Retry, Input, Context, Metadata
from wit_world.imports import host, outgoing_handler, streams
from wit_world.imports.types import (
    Fields,
    Method_Get,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
)

# Rates documents larger than this are refused.
MAX_RATES_BYTES = 1 << 20


def fetch_json(url: str):
    """GETs `url` through wasi:http and parses the body as JSON. A refusal
    (no grant, a timeout, a server error) is worth a retry; the host's
    message names the grant it lacks."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Err(Error_Fail(f"rates_url: {url!r} is not an http(s) URL"))
    request = OutgoingRequest(Fields())
    request.set_method(Method_Get())
    request.set_scheme(Scheme_Https() if parts.scheme == "https" else Scheme_Http())
    request.set_authority(parts.netloc)
    request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    with outgoing_handler.handle(request, None) as future:
        with future.subscribe() as ready:
            ready.block()
        answer = future.get()
    if not isinstance(answer, Ok) or not isinstance(answer.value, Ok):
        error = answer.value.value if isinstance(answer, Ok) else answer
        raise Err(Error_Retry(f"fetching {url}: {error}"))
    with answer.value.value as response:
        status = response.status()
        body = bytearray()
        with response.consume() as incoming:
            with incoming.stream() as stream:
                while True:
                    try:
                        body += stream.blocking_read(65536)
                    except Err as e:
                        if isinstance(e.value, streams.StreamError_Closed):
                            break
                        raise Err(Error_Retry(f"reading {url}: {e.value}"))
                    if len(body) > MAX_RATES_BYTES:
                        raise Err(Error_Fail(f"{url}: more than {MAX_RATES_BYTES} bytes"))
    if status != 200:
        raise Err(Error_Retry(f"{url} answered {status}"))
    return json.loads(body)


class Phase(exports.Phase):
    def describe(self) -> Metadata:
        return Metadata(
            name="convert-currency",
            version="1.0.0",
            description="Converts record amounts to one currency (written in Python)",
        )

    def run(self, ctx: Context, input: Input) -> str:
        config = json.loads(ctx.config)
        if "rates_url" in config:
            rates = fetch_json(config["rates_url"])
            host.log(host.Level.INFO, f"fetched {len(rates)} rates from {config['rates_url']}")
        else:
            rates = config.get("rates", {})
        target = config.get("to", "USD")
        amount_field = config.get("amount", "amount")
        currency_field = config.get("currency", "currency")
        if not input.previous:
            raise Err(Error_Fail("convert-currency needs an earlier phase's records"))
        data = json.loads(input.previous[-1][1])
        records = data.get("records", [])
        converted = 0
        for index, record in enumerate(records, start=1):
            currency = record.get(currency_field)
            amount = record.get(amount_field)
            if currency == target or not isinstance(amount, (int, float)):
                continue
            if currency not in rates:
                raise Err(Error_Fail(f"record {index}: no rate for currency {currency!r}"))
            record[amount_field] = round(amount * rates[currency], 2)
            record[currency_field] = target
            converted += 1
        host.log(host.Level.INFO, f"converted {converted} of {len(records)} records to {target}")
        host.progress(100, f"converted {converted} records")
        return json.dumps({"columns": data.get("columns", []), "rows": len(records), "records": records})
