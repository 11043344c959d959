"""How training/gemini_fixes.py and zero_fixes.py replace colossalai methods: class attributes swapped once per
process, colossalai's own kept so the tests can compare against them (and a test can put them back)."""
from __future__ import annotations


def replace_attributes(replacements: dict, originals: dict) -> None:
    """setattr(cls, name, replacement) for each (cls, name) -> replacement, keeping colossalai's attribute in
    `originals` under the same key. Only the first call replaces: a non-empty `originals` means it is done."""
    if originals:
        return
    for (cls, name), replacement in replacements.items():
        originals[cls, name] = cls.__dict__[name]
        setattr(cls, name, replacement)


def own_attribute(originals: dict, cls, name: str):
    """colossalai's attribute `name` of `cls` as it was before replace_attributes (a function or a property)."""
    return originals.get((cls, name), cls.__dict__[name])
