"""Recipe files: the pydantic schema of a generation run and YAML loading with line-accurate errors.

A recipe says everything about a ``handsynth generate`` run: where the mesh images come from
(``inputs``), the model, the sampler, the Text Attention Stage (``tas``), the prompts, the seed, the
image size and format, the batch size and the output folder. Every field except ``prompts`` has a
default. Unknown keys, wrong types, empty vocabularies, templates naming unknown slots and missing
input paths raise :class:`~handsynth.errors.InputError` naming the recipe file, the field path
(e.g. ``sampler.steps``), its line and a fix.

Paths: relative paths written in a recipe (``inputs.*``, ``output``) resolve against the recipe
file's folder. ``model.base`` / ``model.guidance`` (see :func:`resolve_model_path`) are looked up beside
the recipe, then in the working directory; a name found in neither stays as written (a hub id, or a
missing path that loading reports). The default output folder, ``runs/<recipe stem>-gen``, is relative
to the working directory.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from handsynth.hub import DEFAULT_BASE_MODEL, DEFAULT_GUIDANCE
from handsynth.errors import InputError
from handsynth.keys import sanitize
from handsynth.prompts.templates import HAND_CONFIGS, parse_marked, placeholder_names

EXAMPLE = "outdoor.yaml (`handsynth recipes copy outdoor`)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _text_or_mapping(value: Any) -> Any:
    """Allow a bare string wherever a ``{text: ..., weight: ...}`` entry is expected."""
    return {"text": value} if isinstance(value, str) else value


def _list_or_mapping(value: Any) -> Any:
    """Allow a slot to be written as a bare list of values."""
    return {"values": value} if isinstance(value, list) else value


class Inputs(_Strict):
    """Where the mesh images (and, for modalities files, the prompts) come from: exactly one of
    ``run`` (a ``handsynth render`` run directory) or ``modalities`` (an AttentionHand-style JSON Lines
    file of ``{"mesh", "text"[, "rgb"]}``; its paths resolve against ``root``, default the file's folder).
    """

    run: Optional[Path] = None
    modalities: Optional[Path] = None
    root: Optional[Path] = None


class ModelConfig(_Strict):
    """``guidance``: AttentionHand's converted folder (or its controlnet/), any SD1.5 ControlNet folder or hub
    id, an original-format .safetensors ControlNet file, or ``none``; ``condition``: which render images
    feed it (``mesh``: global/ + local/, ``depth``: depth_global/ + depth_local/)."""

    base: str = DEFAULT_BASE_MODEL
    guidance: str = DEFAULT_GUIDANCE
    condition: Literal["mesh", "depth"] = "mesh"
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class SamplerConfig(_Strict):
    scheduler: Literal["ddim", "dpm++2m", "euler-a", "unipc"] = "ddim"
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(9.0, ge=0.0)
    control_scale: float = Field(1.0, ge=0.0)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    negative_prompt: str = ""


class TASSettings(_Strict):
    """Mirrors ``handsynth.attentionhand.tas.TASConfig`` field by field (see its docstring)."""

    enabled: bool = True
    max_steps: int = Field(10, ge=0)
    iterations: int = Field(1, ge=1)
    step_size_start: float = Field(20.0, ge=0.0)
    step_size_end: float = Field(10.0, ge=0.0)
    attention_res: int = Field(16, ge=1)
    softmax_scale: float = Field(100.0, gt=0.0)
    kernel_size: int = Field(3, ge=1)
    sigma: float = Field(0.5, gt=0.0)
    kernel: Literal["public", "gaussian"] = "public"
    maps_from: Literal["unet", "unet+guidance"] = "unet"

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("the Gaussian kernel needs a centre pixel: use an odd size such as 3")
        return value


class ImageConfig(_Strict):
    """``size``: the generated side (``native``: the long side); ``fit``: how each source frame becomes the
    generated frame - ``crop`` a square about the hands, ``native`` the whole frame at its aspect,
    ``stretch`` the whole frame squashed into a square (distorts; see handsynth.generate.frame)."""

    size: int = Field(512, ge=64, le=2048, multiple_of=8)
    fit: Literal["crop", "native", "stretch"] = "crop"
    format: Literal["jpg", "png"] = "jpg"
    quality: int = Field(95, ge=1, le=100)


class Entry(_Strict):
    """A weighted piece of text (template or slot value); ``vars`` sets template variables."""

    text: str
    weight: float = Field(1.0, gt=0.0)
    vars: dict[str, str] = Field(default_factory=dict)


EntryField = Annotated[Entry, BeforeValidator(_text_or_mapping)]


class Slot(_Strict):
    hand: bool = False
    values: list[EntryField] = Field(min_length=1)


class Templates(_Strict):
    right: list[EntryField] = Field(min_length=1)
    left: list[EntryField] = Field(min_length=1)
    both: list[EntryField] = Field(min_length=1)


class PromptsConfig(_Strict):
    templates: Templates
    slots: dict[str, Annotated[Slot, BeforeValidator(_list_or_mapping)]] = Field(default_factory=dict)


Branch = Literal["global", "local"]


class Recipe(_Strict):
    """``branches``: the images each sample gets - ``[global]`` (default) one image of the whole frame, or
    ``[global, local]`` also a hand-crop image from the render run's local mesh image (two diffusion passes:
    about twice the GPU time per sample)."""

    seed: int = Field(0, ge=0)
    inputs: Optional[Inputs] = None
    branches: list[Branch] = Field(default_factory=lambda: ["global"], min_length=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    tas: TASSettings = Field(default_factory=TASSettings)
    image: ImageConfig = Field(default_factory=ImageConfig)
    batch_size: int = Field(4, ge=1)
    output: Optional[Path] = None
    prompts: Optional[PromptsConfig] = None

    @field_validator("branches")
    @classmethod
    def _global_first(cls, value: list[str]) -> list[str]:
        if value != ["global"] and value != ["global", "local"]:
            raise PydanticCustomError("branches", "must be [global] (one image per sample) or [global, local] "
                                      "(also a hand-crop image, about twice the GPU time)")
        return value

    _path: Optional[Path] = PrivateAttr(default=None)
    _defaults: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Optional[Path]:
        """The recipe file this was loaded from (None when built in code)."""
        return self._path

    @property
    def defaults(self) -> dict[str, Any]:
        """Every field the recipe file left at its default, as ``{dotted.path: value}`` (for printing)."""
        return dict(self._defaults)


# --- loading --------------------------------------------------------------------------------


def _node_at(root: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The deepest YAML node along a pydantic error location; parts not in the tree are skipped."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                continue
            node = match[0] if part == loc[-1] and not isinstance(match[1], yaml.CollectionNode) else match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
    return node


def _key_node(root: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The node of the key itself for a mapping location (so the line is the key's line)."""
    parent = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if getattr(k, "value", None) == loc[-1]:
                return k
    return _node_at(root, loc)


def _unwrap(annotation: Any) -> Any:
    """The pydantic model inside Optional[...] / Annotated[...] / list[...] / dict[str, ...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return annotation


def _model_at(loc: tuple, schema: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The model of ``schema`` (default :class:`Recipe`) that owns the keys at ``loc`` (for suggesting valid keys)."""
    model: Any = schema or Recipe
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        if isinstance(part, str) and part in model.model_fields:
            model = _unwrap(model.model_fields[part].annotation)
        elif isinstance(part, str) and model is Slot and part != "values":
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _where(path: Path, root: yaml.Node | None, loc: tuple, *, key: bool = False) -> str:
    node = _key_node(root, loc) if key and loc else _node_at(root, loc)
    line = f", line {node.start_mark.line + 1}" if node is not None else ""
    return f"{path}, field {_field_path(loc)}{line}"


def _error_from_pydantic(path: Path, root: yaml.Node | None, err: dict, n_errors: int, *,
                         schema: type[BaseModel] | None = None, example: str = EXAMPLE) -> InputError:
    loc = tuple(err["loc"])
    kind, more = err["type"], (f" ({n_errors - 1} more problem(s) after this one)" if n_errors > 1 else "")
    given = err.get("input")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], schema)
        valid = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        fix = (f"did you mean '{close[0]}'? " if close else "remove it or check its spelling; ") + (
            f"valid keys here: {', '.join(valid)}" if valid else f"see {example}")
        return InputError(f"unknown key '{loc[-1]}'{more}", where=_where(path, root, loc, key=True), fix=fix)
    if kind == "missing":
        return InputError(f"required key '{loc[-1]}' is missing{more}", where=_where(path, root, loc[:-1]),
                          fix=f"add '{loc[-1]}:' under {_field_path(loc[:-1])} (see {example})")
    if kind == "too_short" and loc and loc[-1] == "values":
        return InputError(f"slot '{loc[-2]}' has an empty vocabulary{more}", where=_where(path, root, loc, key=True),
                          fix="give it at least one value, or remove the slot and the templates' uses of it")
    if kind == "too_short":
        return InputError(f"{_field_path(loc)} is empty{more}", where=_where(path, root, loc, key=True),
                          fix="give it at least one entry")
    if kind == "literal_error":
        return InputError(f"{_field_path(loc)} is {given!r}, which is not allowed{more}",
                          where=_where(path, root, loc), fix=f"use one of {err['ctx']['expected']}")
    if kind == "model_type" and ("values" in loc or "templates" in loc):
        return InputError(f"{_field_path(loc)} is a {type(given).__name__}{more}", where=_where(path, root, loc),
                          fix="write the entry as text, or as a mapping with 'text' and optional 'weight' / 'vars'")
    shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return InputError(f"{_field_path(loc)}: {err['msg'][0].lower() + err['msg'][1:]}, got {shown}{more}",
                      where=_where(path, root, loc), fix=f"correct the value (the commented example {example} "
                                                         "shows every field with its default)")


# Most nodes a recipe may have once its aliases are expanded (the shipped recipes have about 2,000). YAML
# aliases make a graph whose expansion can grow exponentially with the file ("billion laughs": 400 bytes
# that expand to 10^10 nodes); every later step - duplicate-key check, validation - walks the expansion.
MAX_EXPANDED_NODES = 100_000


def _compose(path: Path, text: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML safely, returning the data and its node tree (for line numbers)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expanded_size(path, node)
            _check_duplicate_keys(path, node)
        data = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise InputError("the recipe nests too deeply to read", where=path,
                         fix="a recipe needs only a few levels of nesting: check for runaway brackets") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"the recipe is not valid YAML: {problem}", where=f"{path}{line}",
                         fix="check indentation, colons and quotes around that line") from None
    finally:
        loader.dispose()
    return data, node


def _check_expanded_size(path: Path, root: yaml.Node) -> None:
    """InputError when ``root`` expands (aliases followed) to more than MAX_EXPANDED_NODES nodes, or when an
    alias refers to a node that contains it. Each distinct node is counted once, so this takes time linear in
    the file, not in the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise InputError("an alias (*name) refers to the anchor (&name) of a node that contains it",
                             where=f"{path}, line {node.start_mark.line + 1}",
                             fix="remove the self-reference: recipes cannot be recursive")
        open_nodes.add(id(node))
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                break
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    if size(root) > MAX_EXPANDED_NODES:
        raise InputError(f"the recipe expands to more than {MAX_EXPANDED_NODES:,} values once its aliases "
                         "(*name) are followed", where=path,
                         fix="write the values out, or use fewer nested aliases (an alias of an alias of "
                             "... multiplies the recipe's size at each level)")


def _check_duplicate_keys(path: Path, node: yaml.Node, trail: tuple = ()) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            if k.value in seen:
                raise InputError(f"key '{k.value}' appears twice",
                                 where=f"{path}, field {_field_path(trail + (k.value,))}, line {k.start_mark.line + 1}",
                                 fix=f"keep one of the two (the first is on line {seen[k.value]})")
            seen[k.value] = k.start_mark.line + 1
            _check_duplicate_keys(path, v, trail + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _check_duplicate_keys(path, v, trail + (i,))


def _check_prompts(path: Path, root: yaml.Node | None, prompts: PromptsConfig) -> None:
    """Cross-field checks: marked text parses, placeholders name slots or variables every value sets."""
    for name, slot in prompts.slots.items():
        for i, value in enumerate(slot.values):
            for loc, text in [(("prompts", "slots", name, "values", i), value.text)] + [
                (("prompts", "slots", name, "values", i, "vars", k), t) for k, t in value.vars.items()
            ]:
                try:
                    parse_marked(text)
                except ValueError as exc:
                    raise InputError(f"bad slot value {text!r}: {exc}", where=_where(path, root, loc),
                                     fix="put each hand word or phrase between one opening and one closing "
                                         "square bracket") from None
            clash = set(value.vars) & set(prompts.slots)
            if clash:
                raise InputError(f"variable '{sorted(clash)[0]}' has the name of a slot",
                                 where=_where(path, root, ("prompts", "slots", name, "values", i, "vars")),
                                 fix="rename the variable")
    for hands in HAND_CONFIGS:
        for i, entry in enumerate(getattr(prompts.templates, hands)):
            loc = ("prompts", "templates", hands, i)
            try:
                names = placeholder_names(entry.text)
            except ValueError as exc:
                raise InputError(f"bad template {entry.text!r}: {exc}", where=_where(path, root, loc),
                                 fix="write placeholders as {slot_name} and put hand words between square "
                                     "brackets") from None
            used = [n for n in names if n in prompts.slots]
            for n in names:
                if n in prompts.slots:
                    continue
                if any(all(n in v.vars for v in prompts.slots[s].values) for s in used):
                    continue
                known = sorted(set(prompts.slots) | {k for s in used for v in prompts.slots[s].values for k in v.vars})
                close = difflib.get_close_matches(n, known, n=1, cutoff=0.5)
                hint = f"did you mean '{{{close[0]}}}'? " if close else ""
                raise InputError(
                    f"template uses '{{{n}}}', which is neither a slot nor a variable set by every value of a "
                    f"slot in the same template", where=_where(path, root, loc),
                    fix=f"{hint}define a slot '{n}' under prompts.slots or fix the name (slots: "
                        f"{', '.join(sorted(prompts.slots)) or 'none'})")


def check_tas_resolution(recipe: Recipe, latent_factor: int, resolutions: list[int] | None = None) -> None:
    """TAS records cross-attention at ``attention_res`` along the longer side: it must divide the latent size
    (image.size / ``latent_factor``, the loaded model's VAE factor: 8 for SD1.5) and, given the model's
    cross-attention map sides at that size (``resolutions``), be one of them. Checked at generate time, when
    the model is loaded; raises InputError naming the recipe file and ``tas.attention_res``."""
    tas, latent = recipe.tas, recipe.image.size // latent_factor
    if not tas.enabled or tas.max_steps == 0:
        return
    divides = recipe.image.size % latent_factor == 0 and latent % tas.attention_res == 0
    if divides and (resolutions is None or tas.attention_res in resolutions):
        return
    where = f"{recipe.path or 'recipe'}, field tas.attention_res"
    if recipe.path is not None and "attention_res" in recipe.tas.model_fields_set:
        _, root = _compose(recipe.path, recipe.path.read_text(encoding="utf-8"))
        where = _where(recipe.path, root, ("tas", "attention_res"))
    if not divides:
        usable = [latent // f for f in (4, 2, 8) if latent % f == 0]
        raise InputError(
            f"tas.attention_res {tas.attention_res} does not divide the latent size {latent} (image.size "
            f"{recipe.image.size} / the model's VAE factor {latent_factor}), so no cross-attention layer has that "
            "resolution", where=where,
            fix=(f"set tas.attention_res to {usable[0]} (a quarter of the latent size, SD1.5's 16 at 512) or "
                 if usable else "") + f"choose an image.size that is a multiple of {16 * latent_factor}")
    raise InputError(
        f"the model has no cross-attention layer with {tas.attention_res}x{tas.attention_res} maps at image.size "
        f"{recipe.image.size} (its layers' maps: {', '.join(f'{r}x{r}' for r in resolutions) or 'none'})",
        where=where, fix=f"set tas.attention_res to one of {', '.join(map(str, resolutions))}" if resolutions
        else "turn TAS off (tas.enabled: false): this model has no cross-attention")


def _resolve(recipe: Recipe, root: yaml.Node | None, path: Path) -> None:
    """Resolve relative paths against the recipe folder and check that inputs exist."""
    folder = path.parent.resolve()
    inputs = recipe.inputs
    if inputs is not None:
        if (inputs.run is None) == (inputs.modalities is None):
            raise InputError("inputs must name exactly one of 'run' or 'modalities'",
                             where=_where(path, root, ("inputs",)),
                             fix="write `run: <render run directory>` or `modalities: <modalities.json>`")
        if inputs.root is not None and inputs.modalities is None:
            raise InputError("inputs.root only applies to a modalities file",
                             where=_where(path, root, ("inputs", "root")), fix="remove 'root' or use 'modalities'")
        for name in ("run", "modalities", "root"):
            value = getattr(inputs, name)
            if value is None:
                continue
            value = value.expanduser()
            resolved = value if value.is_absolute() else folder / value
            if not resolved.exists():
                what = {"run": "render run directory", "modalities": "modalities file", "root": "root folder"}[name]
                raise InputError(f"the {what} '{value}' does not exist (resolved to {resolved})",
                                 where=_where(path, root, ("inputs", name)),
                                 fix="fix the path (relative paths are relative to the recipe's folder)"
                                     + (" or run `handsynth render` first" if name == "run" else ""))
            setattr(inputs, name, resolved)
    if recipe.output is None:
        recipe.output = Path("runs") / f"{sanitize(path.stem)}-gen"
    elif not recipe.output.expanduser().is_absolute():
        recipe.output = folder / recipe.output
    for name in ("base", "guidance"):
        setattr(recipe.model, name, resolve_model_path(getattr(recipe.model, name), folder))
    if recipe.prompts is None and (inputs is None or inputs.modalities is None):
        raise InputError("the recipe has no 'prompts' section", where=_where(path, root, ()),
                         fix=f"add prompts.templates and prompts.slots (copy them from {EXAMPLE}); only recipes "
                             "whose inputs are a modalities file, which carries its own prompts, may leave it out")


def resolve_model_path(value: str, recipe_folder: Path) -> str:
    """``model.base`` / ``model.guidance`` as loading should see it: ``none`` and absolute paths as written; a
    relative path that exists beside the recipe, else in the working directory, as that absolute path;
    anything else as written (a hub id such as owner/name, or a path that loading reports as missing)."""
    path = Path(value).expanduser()
    if value.strip().lower() == "none" or path.is_absolute():
        return value
    for folder in (recipe_folder, Path.cwd()):
        if (folder / path).exists():
            return str((folder / path).resolve())
    return value


M = typing.TypeVar("M", bound=BaseModel)


def load_yaml_model(path: str | Path, schema: type[M], *, example: str) -> tuple[M, Path, yaml.Node | None]:
    """Read a YAML recipe file safely and validate it against the pydantic ``schema``.

    A bare name (``outdoor.yaml``, ``outdoor``) naming no file here is the shipped recipe of that name
    (see :mod:`handsynth.prompts.library`); a note on stderr says which file was used.
    Returns the model, the path read and the YAML node tree (for line numbers in later checks).
    Raises InputError naming the file, the field path, its line and a fix (``example`` names the
    commented recipe to copy from). Every recipe kind (generation, augmentation) loads through here.
    """
    from handsynth.prompts.library import find_recipe, shipped_names

    path, shipped = find_recipe(path)
    if shipped:
        from handsynth.console import console

        console.print(f"[dim]using the shipped recipe {path} (copy it out for editing with `handsynth recipes "
                      f"copy {path.stem}`)[/dim]", soft_wrap=True)
    if not path.is_file():
        raise InputError(f"recipe file '{path}' not found", where=path,
                         fix=f"pass the path of a recipe YAML file (e.g. {example}), or the name of a shipped "
                             f"recipe ({shipped_names()}; `handsynth recipes` lists them)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the recipe: {exc}", where=path, fix="pass a readable UTF-8 YAML file") from None
    data, root = _compose(path, text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"the recipe must be a mapping of keys, not a {type(data).__name__}", where=path,
                         fix=f"start from {example}")
    try:
        model = schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        raise _error_from_pydantic(path, root, errors[0], len(errors), schema=schema, example=example) from None
    return model, path, root


def load_recipe(path: str | Path, schema: type[Recipe] | None = None) -> Recipe:
    """Read, validate and resolve a recipe file; raises InputError with file, field, line and fix.

    ``schema``: the recipe model (default :class:`Recipe`, a generation recipe; ``handsynth train`` passes
    its own, which shares the sections and adds ``train``).
    """
    recipe, path, root = load_yaml_model(path, schema or Recipe, example=EXAMPLE)
    if recipe.prompts is not None:
        _check_prompts(path, root, recipe.prompts)
    defaults = _defaults_used(recipe)
    _resolve(recipe, root, path)
    if "output" in defaults:
        defaults["output"] = recipe.output
    recipe._path, recipe._defaults = path, defaults
    return recipe


def _defaults_used(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if name not in model.model_fields_set:
                if isinstance(value, BaseModel):
                    walk(value, f"{prefix}{name}.")
                elif name != "prompts":
                    out[f"{prefix}{name}"] = value
            elif isinstance(value, BaseModel) and name != "prompts":
                walk(value, f"{prefix}{name}.")

    walk(recipe, "")
    return out
