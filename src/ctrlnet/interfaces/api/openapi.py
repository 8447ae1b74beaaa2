"""The service's OpenAPI document with this server's facts in it: the request bodies (parsed by
hand, so published here), their bounds from :class:`~ctrlnet.interfaces.limits.Limits`, the enums
(samplers, schedules, annotators, control/resize modes, loaded ControlNets), so generated clients
and fuzzers stay in range. (The bearer scheme comes from the auth dependency, see :mod:`.app`.)"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ctrlnet.generation.request import MAX_SEED, ControlMode, HiresOption, InpaintFill, ResizeMode, Upscaler

def _set(prop: dict, **kw) -> None:
    """Constrain a property; for ``Optional[...]`` (anyOf with null) the non-null branch."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    for b in branches or [prop]:
        b.update(kw)


def _enum(values) -> list:
    return list(dict.fromkeys(values))  # unique, in order


def _bounds(schemas: dict, ctx) -> None:
    from ctrlnet.annotators import list_annotators
    from ctrlnet.generation.presets import PRESETS
    from ctrlnet.sampling.names import SAMPLER_ALIASES, sampler_names, schedule_names
    from ctrlnet.sampling.registry import SAMPLERS
    from ctrlnet.sampling.schedule import SCHEDULES

    lim = ctx.limits
    g = schemas["GenerateBody"]["properties"]
    for k in ("prompt", "added_prompt", "negative_prompt"):
        _set(g[k], maxLength=lim.max_prompt_chars)
    _set(g["controls"], maxItems=lim.max_controls)
    _set(g["num_images"], minimum=1, maximum=lim.max_images)
    _set(g["resolution"], minimum=64, maximum=lim.max_resolution)
    for k in ("width", "height"):
        _set(g[k], minimum=64, maximum=lim.max_resolution, multipleOf=8)
    _set(g["max_pixels"], minimum=64 * 64, maximum=lim.max_output_pixels)
    _set(g["steps"], minimum=1, maximum=lim.max_steps)
    _set(g["hires_steps"], minimum=0, maximum=lim.max_steps)
    _set(g["guidance_scale"], minimum=0, maximum=50)
    _set(g["eta"], minimum=0, maximum=1)
    _set(g["seed"], minimum=-1, maximum=MAX_SEED)
    _set(g["clip_skip"], enum=[1, 2])
    _set(g["prompt_chunks"], minimum=1, maximum=3)
    for k in ("denoising_strength", "hires_denoising_strength"):
        _set(g[k], minimum=0, maximum=1)
    _set(g["mask_blur"], minimum=0, maximum=64)
    _set(g["only_masked_padding"], minimum=0, maximum=256)
    _set(g["hires_scale"], minimum=1, maximum=8)
    _set(g["tile_size"], minimum=64, maximum=max(64, lim.max_resolution), multipleOf=8)
    _set(g["tile_overlap"], minimum=0, maximum=256, multipleOf=8)
    _set(g["sampler"], enum=_enum([*SAMPLERS, *SAMPLER_ALIASES, *sampler_names(with_schedules=True)]))
    _set(g["schedule"], enum=_enum([*SCHEDULES, *schedule_names()]))
    _set(g["preset"], enum=_enum(PRESETS))
    _set(g["inpaint_fill"], enum=[m.value for m in InpaintFill])
    _set(g["hires_upscaler"], enum=[m.value for m in Upscaler])
    for k in ("init_image", "mask"):
        _set(g[k], contentEncoding="base64")
    g["loras"]["maxItems"] = 8
    g["loras"]["items"]["prefixItems"][1].update(minimum=-4, maximum=4)

    c = schemas["ControlBody"]["properties"]
    _set(c["image"], contentEncoding="base64")
    _set(c["model"], enum=list(ctx.models.controlnets) or [None])
    _set(c["annotator"], enum=list_annotators())
    _set(c["detect_resolution"], minimum=64, maximum=lim.max_resolution)
    _set(c["control_mode"], enum=[m.value for m in ControlMode])
    _set(c["resize_mode"], enum=[m.value for m in ResizeMode])
    _set(c["hr_option"], enum=[m.value for m in HiresOption])

    a = schemas["AnnotateBody"]["properties"]
    _set(a["annotator"], enum=list_annotators())
    _set(a["resolution"], minimum=64, maximum=lim.max_resolution)
    _set(a["image"], contentEncoding="base64")


def document(app: FastAPI, ctx) -> dict:
    """The OpenAPI document (built once per app)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from ctrlnet.interfaces.api.v1 import AnnotateBody, GenerateBody

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for m in (GenerateBody, AnnotateBody):
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(s.pop("$defs", {}))
        comps[m.__name__] = s
    _bounds(comps, ctx)
    app.openapi_schema = schema
    return schema
