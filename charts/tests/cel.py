#!/usr/bin/env python3
"""Evaluates a CEL expression (e.g. a webhook's matchConditions) on objects, with cel-python
and the Kubernetes string extensions the project's expressions use (trim, lowerAscii).

usage: cel.py EXPRESSION ACTIVATIONS_JSON
ACTIVATIONS_JSON is a list of objects (each the variables, e.g. {"object": {...}});
prints a JSON list with, for each, its boolean result or {"error": "..."}.
exit 3 when a package is missing (the caller says how to install it).
"""
import json
import sys

try:
    import celpy
    import celpy.celtypes as celtypes
except ImportError as e:  # pragma: no cover
    print(f"missing python package: {e.name}; pip install cel-python", file=sys.stderr)
    sys.exit(3)


def trim(s):
    # cel-go's strings extension: leading and trailing Unicode white space.
    return celtypes.StringType(str(s).strip())


def lower_ascii(s):
    # ASCII letters only, as cel-go's lowerAscii.
    return celtypes.StringType("".join(c.lower() if "A" <= c <= "Z" else c for c in str(s)))


expression, activations = sys.argv[1], json.loads(sys.argv[2])
env = celpy.Environment()
program = env.program(env.compile(expression), functions={"trim": trim, "lowerAscii": lower_ascii})
results = []
for variables in activations:
    try:
        value = program.evaluate(celpy.json_to_cel(variables))
        results.append(bool(value) if isinstance(value, celtypes.BoolType) else {"error": f"not a bool: {value!r}"})
    except Exception as e:  # an evaluation error is a result to report
        results.append({"error": str(e)})
print(json.dumps(results))
