"""Hydra's composition errors (several lines, a search path, a suggestion to add a misspelt key) as
one line that names the bad override, the key and what to give instead (used by
:func:`hpcprune.sweep.precheck_argv` before anything runs)."""
from __future__ import annotations

from typing import Any


def _override_key(arg: str) -> str:
    """``+model@x=y`` -> ``model``; ``~model.width`` -> ``model.width``."""
    return arg.partition("=")[0].lstrip("+~").partition("@")[0]


def _one_line(e: BaseException, dry: Any, overrides: list[str]) -> str:
    """Hydra's composition error (several lines, a search path) as one line naming the bad value."""
    import re

    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e).strip()
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
        if m:
            group, name = m.groups()
            options = list(e.options or []) or dry.options(group, overrides)
            given = [a for a in overrides if _override_key(a) == group and a.partition("=")[2] == name]
            head = given[-1] if given else f"{group}={name} (a defaults list, primary config {dry.config_name!r})"
            choose = f" (choose from: {', '.join(options)})" if options else ""
            return f"{head}: unknown {group} {name!r}, no such config{choose}"
        m = re.search(r"Cannot find primary config '([^']+)'", text)
        if m:
            options = [o for o in dry.options("", overrides) if not o.startswith("_")]  # Hydra's _dummy_empty_config_
            choose = f" (choose from: {', '.join(options)})" if options else ""
            if dry.args.config_name is not None:
                return f"--config-name {m.group(1)}: no such primary config{choose}"
            return f"no primary config {m.group(1)!r} in --config-path {dry.args.config_path}{choose}"
    if isinstance(e, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for arg in overrides:
            try:
                parser.parse_override(arg)
            except Exception as pe:
                return f"{arg}: not a valid override ({str(pe).strip().splitlines()[0]})"
    typed = _schema_error(e, text, overrides) or _unknown_key(text, dry, overrides)
    if typed:
        return typed
    lines = []
    for ln in text.splitlines():
        if ln.strip().startswith(("Config search path", "Search path", "See https://")):
            break
        if ln.strip():
            lines.append(ln.strip())
    msg = " ".join(lines) or type(e).__name__
    if type(e).__module__.split(".")[0] != "hydra":  # e.g. a YAML error in a config file: say which kind
        msg = f"{type(e).__name__}: {msg}"
    return msg


def _unknown_key(text: str, dry: Any, overrides: list[str]) -> str | None:
    """Hydra's "Could not override 'prune.taget.macs'. To append to your config use +..." (which
    suggests adding the misspelt key) as: the override, no such key, the config's closest keys."""
    import difflib
    import re

    from omegaconf import OmegaConf

    from .config import flat

    m = re.match(r"Could not override '([^']+)'", text)
    if not m:
        return None
    key = m.group(1)
    given = [a for a in overrides if _override_key(a) == key]
    try:
        rest = [a for a in overrides if _override_key(a) != key]
        cfg = OmegaConf.to_container(dry.compose(rest), resolve=False)
        cfg.pop("hydra", None)
        keys = list(flat(cfg))
        keys += sorted({k.rsplit(".", i)[0] for k in keys for i in (1, 2) if "." in k})
    except Exception:
        keys = []
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"{given[-1] if given else key}: no such key {key!r} in the config; {hint}"
            f"(+{key}=VALUE adds a new key, for a function that takes it)")


def _schema_error(e: BaseException, text: str, overrides: list[str]) -> str | None:
    """A value the schema (hpcprune/schema.py) refuses while Hydra composes (or, in a config file, a
    key it does not have), as one line naming the override or the config file, the key, and why
    (the choices, for an unknown choice):
    ``prune.method=magic: Invalid value 'magic', expected one of [uniform, global, sensitivity]``,
    ``In 'experiment/mine': threads: Value 'abc' of type 'str' could not be converted to Integer``.
    None for any other error."""
    import re

    from omegaconf.errors import ValidationError

    cause = e.__cause__ if isinstance(e.__cause__, ValidationError) else None
    if cause is not None:  # an override: Hydra says "Error merging override ARG", the cause says why
        m = re.match(r"Error merging override (.+)$", text)
        key, why = str(cause.full_key or ""), str(cause.msg).strip().splitlines()[0]
        given = m.group(1) if m and m.group(1) in overrides else None
        if given is None:
            return f"{key}: {why}" if key else None
        return f"{given}: {why}" + (f" (at {key})" if key and key != _override_key(given) else "")
    m = re.match(r"(In '[^']+'): \w+ raised while composing config:\n(.+?)\n\s*full_key: (\S+)", text)
    if m:  # a value in a config file
        return f"{m.group(1)}: {m.group(3)}: {m.group(2).strip()}{_close_field(m.group(2))}"
    return None


def _close_field(why: str) -> str:
    """" (did you mean epochs?)" for the schema's "Key 'epoch' not in 'BaselineConfig'", else ""."""
    import dataclasses
    import difflib
    import re

    from . import schema

    m = re.match(r"Key '([^']+)' not in '(\w+)'", why.strip())
    node = getattr(schema, m.group(2), None) if m else None
    if node is None or not dataclasses.is_dataclass(node):
        return ""
    close = difflib.get_close_matches(m.group(1), [f.name for f in dataclasses.fields(node)], n=3, cutoff=0.7)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
