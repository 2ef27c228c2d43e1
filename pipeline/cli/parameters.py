"""Option sets: typer options declared once that build one object (``RunOptions``, a rank rule's
flags, the LoRAs of a command), expanded into the signature of every command that takes them.

A command function names the object as a parameter (``run: RunOptions``); ``expand`` replaces
that parameter with the set's options for typer to parse, and hands the function the object
built from their values. Typer reads the signature and the annotations, so both are rewritten."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptionSet:
    into: str  # the command function's parameter that receives the built object
    build: Callable[..., object]  # option values (and ``fixed``) by parameter name → the object
    options: Mapping[str, tuple[object, object]]  # parameter name → (typer annotation, default)
    fixed: Mapping[str, object] = field(default_factory=dict)  # passed to build, no option

    def only(self, *names: str, fixed: Mapping | None = None, **replaced) -> OptionSet:
        """The set with only the options ``names`` (in the set's order), others at ``fixed``
        values or their defaults, and ``replaced`` options (name → (annotation, default))."""
        unknown = set(names) - set(self.options) | set(replaced) - set(names)
        if unknown:
            raise ValueError(f"not options of this set, or replaced but not kept: {unknown}")
        options = {n: replaced.get(n, spec) for n, spec in self.options.items() if n in names}
        return dataclasses.replace(self, options=options, fixed={**self.fixed, **(fixed or {})})


def expand(*sets: OptionSet) -> Callable[[Callable], Callable]:
    """Decorate a command function: each set's ``into`` parameter becomes the set's options,
    where that parameter stands (so ``--help`` lists them there); the function gets the built
    objects."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    by_target = {s.into: s for s in sets}

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function, eval_str=True)
        parameters = []
        for parameter in signature.parameters.values():
            expanded = by_target.get(parameter.name)
            if expanded is None:
                parameters.append(parameter.replace(kind=keyword))
                continue
            parameters += [
                inspect.Parameter(name, keyword, default=default, annotation=annotation)
                for name, (annotation, default) in expanded.options.items()
            ]
        missing = set(by_target) - set(signature.parameters)
        if missing:
            raise TypeError(f"{function.__name__} has no parameter {', '.join(sorted(missing))}")

        @functools.wraps(function)
        def command(**values):
            for s in sets:
                picked = {name: values.pop(name) for name in s.options}
                values[s.into] = s.build(**s.fixed, **picked)
            return function(**values)

        command.__signature__ = signature.replace(parameters=parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate
