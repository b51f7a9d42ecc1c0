"""``python -m train.methods``: the distillation methods of the registry, what each reads and its
hyperparameters' official values (the names ``python -m train --method``, ``precompute --fields``
and ``train.sweep --methods`` take)."""
from __future__ import annotations

import dataclasses
import sys
import textwrap

from train.methods import METHODS


def describe(cls) -> str:
    """A method's lines: its name and summary, teacher fields (and where a family's differ), field presets,
    artefacts, and its
    config keys with their RetinaNet values and what other families change."""
    module_doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    summary = module_doc.strip().splitlines()[0] if module_doc.strip() else ""
    lines = [f"{cls.NAME:<8} {summary}", f"  fields     {', '.join(cls.FIELDS) or '-'}"]
    lines += [_wrapped("", f"{family}: {', '.join(fields)}") for family, fields in cls.FAMILY_FIELDS.items()]
    lines += [f"  preset     {name}: {', '.join(fields)}" for name, fields in cls.FIELD_PRESETS.items()]
    if cls.ARTIFACTS:
        lines.append(f"  artefacts  {', '.join(cls.ARTIFACTS)} (made once per cache by precompute)")
    if dataclasses.is_dataclass(cls.Config) and dataclasses.fields(cls.Config):
        first, *others = cls.Config.FAMILY_DEFAULTS
        official = dataclasses.asdict(cls.Config.for_family(first))
        lines.append(_wrapped("--set", f"{cls.NAME}.KEY, official values for {first}: "
                              + ", ".join(f"{key}={value!r}" for key, value in official.items())))
        for family in others:
            changed = {key: value for key, value in dataclasses.asdict(cls.Config.for_family(family)).items()
                       if value != official[key]}
            lines.append(_wrapped(family, ", ".join(f"{key}={value!r}" for key, value in changed.items())
                                  or f"as {first}"))
    return "\n".join(lines)


def _wrapped(label: str, text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13,
                         break_on_hyphens=False)


def main() -> int:
    print("Distillation methods (--method NAME, or NAME+NAME to add their terms; --fields NAME or a preset):\n")
    print("\n\n".join(describe(cls) for cls in METHODS.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
