"""convert-currency: a jobhost phase written in Python (componentize-py).

Reads the records of the previous phase (as `csv-parse` makes them), converts
each record's amount to one currency with the rates from the config, and
passes the records on in the same shape, so `aggregate` can follow it.

Config: {"rates": {"EUR": 1.08, "GBP": 1.27}, "to": "USD",
         "amount": "amount", "currency": "currency"}
A record already in `to` keeps its amount; an unknown currency fails the
phase permanently, naming the record.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.phase import Error_Fail, Input, Context, Metadata
from wit_world.imports import host


class Phase(exports.Phase):
    def describe(self) -> Metadata:
        return Metadata(
            name="convert-currency",
            version="1.0.0",
            description="Converts record amounts to one currency (written in Python)",
        )

    def run(self, ctx: Context, input: Input) -> str:
        config = json.loads(ctx.config)
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
