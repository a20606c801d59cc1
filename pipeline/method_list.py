"""`curate methods`: every embed, score, select, online and distill method with its options and
defaults, read from the config models (their `method` Literals and discriminated unions, their
pydantic fields and defaults) and from pipeline.methods: a new method or option appears here by
itself, and no list is kept by hand.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import RunConfig
from .methods import ONLINE, SCORES

# where each kind of method is named in a run config, and how a config uses it
KINDS = {
    "embed": (("embed",), "embed: {method: NAME, ...}"),
    "score": (("score",), "score: {methods: [NAME, ...], ...}"),
    "select": (("select",), "select: [{method: NAME, budget: B, ...}]"),
    "online": (("verify", "online"), "verify: {online: [{method: NAME, budget: F, ...}]}"),
    "distill": (("distill", "specs"), "distill: [{method: NAME, ipc: K, ...}]"),
}


@dataclass
class Option:
    name: str  # dotted for nested sections (clip.epochs)
    type: str
    default: str  # as YAML writes it; "required" where there is none


@dataclass
class Method:
    name: str
    about: str = ""
    facts: list[str] = field(default_factory=list)  # needs, weights, value score, selector
    options: list[Option] = field(default_factory=list)  # beyond those every method of its kind takes


@dataclass
class Kind:
    name: str
    usage: str
    methods: list[Method]
    common: list[Option]  # every method of this kind takes these
    section: str = ""  # where the common options live (embed.*, score.*)
    extra: dict[str, list[Option]] = field(default_factory=dict)  # further sections (distill.experts)


def _type(ann) -> str:
    """An annotation as a user reads it: `a | b` for choices, `int >= 1`-style bounds are added by _bounds."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys("null" if a is type(None) else _type(a) for a in args))
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _bounds(info) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length"}
    out = []
    for m in info.metadata:
        for attr, sym in ops.items():
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return f" ({', '.join(out)})" if out else ""


def _value(v) -> str:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    if v is None:
        return "null"
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _section_model(ann) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def options(model: type[BaseModel], skip: tuple[str, ...] = ("method",), prefix: str = "") -> list[Option]:
    """Every field of `model` with its type, bounds and default; nested sections are flattened."""
    out = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        sub = _section_model(info.annotation)
        if sub is not None:
            out += options(sub, (), f"{prefix}{name}.")
            continue
        if info.default_factory is not None:
            default = _value(info.default_factory())
        elif info.default is PydanticUndefined:
            default = "required"
        else:
            default = _value(info.default)
        out.append(Option(prefix + name, _type(info.annotation) + _bounds(info), default))
    return out


def _annotation_at(path: tuple[str, ...]):
    """The annotation of a config field reached from RunConfig by `path`."""
    model, ann = RunConfig, None
    for key in path:
        ann = model.model_fields[key].annotation
        model = _section_model(ann)
        if model is None:
            inner = _unwrap_list(ann)
            model = _section_model(inner)
    return ann


def _unwrap_list(ann):
    while typing.get_origin(ann) in (list, tuple):
        ann = typing.get_args(ann)[0]
    return ann


def _spec_classes(ann) -> list[type[BaseModel]]:
    """The classes of a (list of a) discriminated union of specs, or the one spec model."""
    ann = _unwrap_list(ann)
    if typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(ann) if _section_model(a)]
    model = _section_model(ann)
    return [model] if model else []


def _method_names(model: type[BaseModel]) -> list[str]:
    ann = model.model_fields["method"].annotation
    return [str(a) for a in typing.get_args(ann)] if typing.get_origin(ann) is typing.Literal else []


def _about(cls) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _spec_facts(cls) -> list[str]:
    facts = []
    needs = getattr(cls, "needs", None)
    if needs:
        facts.append("needs " + ", ".join(sorted(needs)))
    if getattr(cls, "weights", False):
        facts.append("coreset weights")
    return facts


def _specs_kind(name: str, path, usage: str) -> Kind:
    """select / distill: one spec class per method, each with its own options."""
    classes = _spec_classes(_annotation_at(path))
    shared = [c for c in classes[0].__mro__ if all(c in k.__mro__ for k in classes)]
    base = next(c for c in shared if "method" in getattr(c, "model_fields", {}))  # SelectSpec, DistillSpec
    common = {o.name: o for o in options(base)}
    methods = []
    for cls in classes:
        own = [o for o in options(cls) if common.get(o.name) != o]
        for m in _method_names(cls):
            methods.append(Method(m, _about(cls), _spec_facts(cls), own))
    return Kind(name, usage, methods, list(common.values()))


def _section_kind(name: str, path, usage: str) -> Kind:
    """embed: one section whose `method` Literal names the methods; its options are shared."""
    models = _spec_classes(_annotation_at(path))
    if len(models) > 1:  # a discriminated union of method sections: one spec class per method
        return _specs_kind(name, path, usage)
    model = models[0]
    methods = [Method(m) for m in _method_names(model)]
    return Kind(name, usage, methods, options(model), section=".".join(path) + ".*")


def _score_kind(name: str, path, usage: str) -> Kind:
    model = _section_model(_annotation_at(path))
    methods = []
    for m, s in SCORES.items():
        facts = ["needs " + ", ".join(sorted(s.needs))]
        if s.value:
            facts.append("value score: higher = more valuable")
        methods.append(Method(m, facts=facts))
    return Kind(name, usage, methods, options(model, ("methods",)), section=".".join(path) + ".*")


def _online_kind(name: str, path, usage: str) -> Kind:
    (model,) = _spec_classes(_annotation_at(path))
    every = {o.name: o for o in options(model)}
    taken = {o for m in ONLINE.values() for o in m.options}
    methods = []
    for m in _method_names(model):
        o = ONLINE[m]
        facts = [f"selector {o.selector}"] + (["coreset weights"] if o.weights else [])
        methods.append(Method(m, facts=facts, options=[every[k] for k in o.options if k in every]))
    return Kind(name, usage, methods, [v for k, v in every.items() if k not in taken])


def catalogue() -> dict[str, Kind]:
    """Every kind of method, from the config models and pipeline.methods."""
    out = {}
    for name, (path, usage) in KINDS.items():
        build = {"score": _score_kind, "online": _online_kind, "select": _specs_kind,
                 "distill": _specs_kind}.get(name, _section_kind)
        out[name] = build(name, path, usage)
    distill = RunConfig.model_fields["distill"].annotation
    for key, info in distill.model_fields.items():  # the sections beside the specs (experts)
        sub = _section_model(info.annotation)
        if sub is not None:
            out["distill"].extra[f"distill.{key}.*"] = options(sub)
    return out


def as_json(kinds: dict[str, Kind]) -> str:
    return json.dumps({k: asdict(v) for k, v in kinds.items()}, indent=1)


def _option_lines(opts: list[Option], indent: str) -> list[str]:
    width = max((len(o.name) for o in opts), default=0)
    twidth = min(max((len(o.type) for o in opts), default=0), 40)
    return [f"{indent}{o.name:<{width}}  {o.type:<{twidth}}  {o.default}" for o in opts]


def render(kinds: dict[str, Kind]) -> str:
    """Plain text: per kind its usage, the options every method takes, then each method."""
    lines = []
    for kind in kinds.values():
        lines.append(f"{kind.name} methods   ({kind.usage})")
        if kind.common:
            where = kind.section or f"every {kind.name} method"
            lines.append(f"  options ({where}):")
            lines += _option_lines(kind.common, "    ")
        for sec, opts in kind.extra.items():
            lines.append(f"  options ({sec}):")
            lines += _option_lines(opts, "    ")
        width = max(len(m.name) for m in kind.methods)
        for m in kind.methods:
            facts = "; ".join(m.facts)
            lines.append(f"  {m.name:<{width}}  {facts}".rstrip())
            if m.about:
                lines.append(f"      {m.about}")
            lines += _option_lines(m.options, "      ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
