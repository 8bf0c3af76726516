"""Physics from HDF5 (h5py), in the two layouts people publish, one sample per trajectory.

PDEBench (Takamoto et al. 2022):
  - `tensor` [samples, time, x(, y)(, z)(, fields)] and/or named field datasets (`density`,
    `pressure`, `Vx`, `Vy`, ...) [samples, time, x(, y)(, z)], with `x-coordinate`,
    `y-coordinate`, `z-coordinate`, `t-coordinate` datasets. The spatial rank is the number of
    coordinate datasets (without them: every axis after time is spatial); an axis left after
    the spatial ones is the fields axis.
  - one group per sample (`0000/data` [time, x(, y), fields], `0000/grid/x`, `.../y`, `.../t`).
The Well (Ohana et al. 2024): groups `t0_fields` (scalars [traj, time, *grid]), `t1_fields`
(vectors [..., D]), `t2_fields` (tensors [..., D, D]); `dimensions` (`time`, one dataset per
spatial axis, attribute `spatial_dims`); `boundary_conditions` (one subgroup per condition,
attribute `bc_type`); `scalars` (the simulation's constants). A field whose `sample_varying` or
`time_varying` attribute is false is shared by all trajectories or all times and is broadcast.

Every trajectory comes out as fields [T, C, *grid] float32 with the schema's metadata:
channel_names, grid_spacing (one per spatial axis, from the coordinates), time_step, parameters,
plus boundary_conditions and dimensions where the file has them. `write_pdebench` writes the
first layout (what `mmfm generate --to physics` writes as .h5).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

HDF5_EXTS = ("h5", "hdf5", "hdf")
_COORDS = ("x-coordinate", "y-coordinate", "z-coordinate")
_AXES = ("x", "y", "z")


class HDF5LayoutError(ValueError):
    """An HDF5 file in neither layout, or with shapes that disagree; the message says which dataset."""


def _spacing(coord) -> float:
    c = np.asarray(coord, dtype=np.float64).reshape(-1)
    return float(c[1] - c[0]) if c.size > 1 else 1.0


def _scalar_attrs(attrs) -> dict:
    out = {}
    for k, v in attrs.items():
        v = v.item() if isinstance(v, np.generic) else v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def _string(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def layout_of(f) -> str:
    if "t0_fields" in f or "t1_fields" in f:
        return "the_well"
    if "tensor" in f or any(isinstance(f[k], _dataset_type()) and f[k].ndim >= 3 for k in f):
        return "pdebench"
    groups = [k for k in f if not isinstance(f[k], _dataset_type())]
    if groups and all("data" in f[g] for g in groups):
        return "pdebench_groups"
    raise HDF5LayoutError(f"neither layout: no t0_fields/t1_fields groups (The Well), no 'tensor' or "
                          f"[samples, time, ...] datasets, no per-sample groups with 'data' (PDEBench); "
                          f"top-level names: {sorted(f)[:20]}")


def _dataset_type():
    import h5py

    return h5py.Dataset


def _pdebench(f) -> Iterator[tuple[np.ndarray, dict]]:
    dims = sum(1 for c in _COORDS if c in f)
    fields, names = [], []
    # datasets in the order the writer listed (write_pdebench records it), else by name
    listed = [_string(n) for n in f.attrs.get("channel_names", [])]
    order = [k for k in listed if k in f] + sorted(k for k in f if k not in listed)
    for k in order:
        ds = f[k]
        if not isinstance(ds, _dataset_type()) or k in _COORDS or k == "t-coordinate" or ds.ndim < 3:
            continue
        fields.append(ds)
        names.append(k)
    if not fields:
        raise HDF5LayoutError("PDEBench layout: no [samples, time, ...] dataset")
    if not dims:
        dims = min(ds.ndim for ds in fields) - 2
    if not 1 <= dims <= 3:
        raise HDF5LayoutError(f"PDEBench layout: {dims} spatial axes; 1 to 3 are read")
    n = fields[0].shape[0]
    grid = fields[0].shape[2:2 + dims]
    channel_names = []
    for name, ds in zip(names, fields):
        extra = ds.ndim - 2 - dims
        if ds.shape[0] != n or ds.shape[2:2 + dims] != grid or extra not in (0, 1):
            raise HDF5LayoutError(f"PDEBench layout: dataset {name!r} has shape {ds.shape}; expected "
                                  f"[{n}, time, {', '.join(map(str, grid))}(, fields)]")
        if extra:
            channel_names += [f"{'u' if name == 'tensor' else name}{i}" for i in range(ds.shape[-1])]
        else:
            channel_names.append("u" if name == "tensor" else name)
    spacing = [_spacing(f[_COORDS[a]]) if _COORDS[a] in f else 1.0 / grid[a] for a in range(dims)]
    time_step = _spacing(f["t-coordinate"]) if "t-coordinate" in f else 1.0
    params = {k: v for k, v in _scalar_attrs(f.attrs).items() if k != "channel_names"}
    base = {"channel_names": channel_names, "grid_spacing": spacing, "time_step": time_step,
            "parameters": params, "dimensions": ["t", *_AXES[:dims]], "layout": "pdebench"}
    for i in range(n):
        parts = []
        for ds in fields:
            a = np.asarray(ds[i], dtype=np.float32)
            a = a[..., None] if a.ndim == 1 + dims else a
            parts.append(np.moveaxis(a, -1, 1))  # [T, *grid, C] -> [T, C, *grid]
        t = min(p.shape[0] for p in parts)
        yield np.concatenate([p[:t] for p in parts], axis=1), dict(base)


def _pdebench_groups(f) -> Iterator[tuple[np.ndarray, dict]]:
    for g in sorted(k for k in f if not isinstance(f[k], _dataset_type())):
        grp = f[g]
        if "data" not in grp:
            raise HDF5LayoutError(f"PDEBench per-sample layout: group {g!r} has no 'data' dataset")
        a = np.asarray(grp["data"], dtype=np.float32)
        grid_grp = grp["grid"] if "grid" in grp else {}
        dims = sum(1 for ax in _AXES if ax in grid_grp) or a.ndim - 2
        if a.ndim != dims + 2:
            raise HDF5LayoutError(f"PDEBench per-sample layout: {g}/data has shape {a.shape}; expected "
                                  f"[time, {dims} spatial axes, fields]")
        spacing = [_spacing(grid_grp[ax]) if ax in grid_grp else 1.0 / a.shape[1 + i] for i, ax in enumerate(_AXES[:dims])]
        meta = {"channel_names": [f"u{i}" for i in range(a.shape[-1])], "grid_spacing": spacing,
                "time_step": _spacing(grid_grp["t"]) if "t" in grid_grp else 1.0,
                "parameters": _scalar_attrs(f.attrs), "dimensions": ["t", *_AXES[:dims]], "layout": "pdebench"}
        yield np.moveaxis(a, -1, 1), meta


def _the_well(f) -> Iterator[tuple[np.ndarray, dict]]:
    dim_grp = f["dimensions"] if "dimensions" in f else None
    if dim_grp is None or "time" not in dim_grp:
        raise HDF5LayoutError("The Well layout: no 'dimensions/time' dataset")
    axes = [_string(a) for a in dim_grp.attrs.get("spatial_dims", [a for a in _AXES if a in dim_grp])]
    n = int(f.attrs.get("n_trajectories", 0))
    fields = []  # (name, dataset, rank)
    for rank, gname in enumerate(("t0_fields", "t1_fields", "t2_fields")):
        if gname in f:
            for k in sorted(f[gname]):
                fields.append((k, f[gname][k], rank))
                if not n and f[gname][k].attrs.get("sample_varying", True):
                    n = f[gname][k].shape[0]
    if not fields:
        raise HDF5LayoutError("The Well layout: t0_fields/t1_fields/t2_fields hold no dataset")
    time = dim_grp["time"]
    params = {}
    if "scalars" in f:
        for k in f["scalars"]:
            v = np.asarray(f["scalars"][k]).reshape(-1)
            if v.size == 1 and np.issubdtype(v.dtype, np.number):
                params[k] = float(v[0])
    bcs = {}
    if "boundary_conditions" in f:
        for k in f["boundary_conditions"]:
            bcs[k] = _string(f["boundary_conditions"][k].attrs.get("bc_type", "unknown"))
    for i in range(n):
        t = np.asarray(time[i] if time.attrs.get("sample_varying", False) else time[()], dtype=np.float64)
        channels, names = [], []
        for name, ds, rank in fields:
            a = np.asarray(ds[i] if ds.attrs.get("sample_varying", True) else ds[()], dtype=np.float32)
            if not ds.attrs.get("time_varying", True):
                a = np.broadcast_to(a, (len(t),) + a.shape)
            grid_rank = a.ndim - 1 - rank
            if grid_rank != len(axes):
                raise HDF5LayoutError(f"The Well layout: {ds.name} has shape {ds.shape}; expected "
                                      f"{len(axes)} spatial axes ({', '.join(axes)}) and {rank} component axes")
            comps = a.reshape(a.shape[:1 + grid_rank] + (-1,))
            # a vector's components are separate channels, u_x, u_y; a tensor's u_xx, u_xy, ... (row-major)
            suffixes = ["_" + "".join(axes[j] for j in idx) if idx else "" for idx in np.ndindex(*(len(axes),) * rank)]
            for j, sfx in enumerate(suffixes):
                channels.append(comps[..., j])
                names.append(name + sfx)
        spacing = [_spacing(dim_grp[ax]) if ax in dim_grp else 1.0 for ax in axes]
        meta = {"channel_names": names, "grid_spacing": spacing, "time_step": _spacing(t), "parameters": params,
                "dimensions": ["t", *axes], "layout": "the_well"}
        if bcs:
            meta["boundary_conditions"] = bcs
        yield np.stack(channels, axis=1), meta


def iter_trajectories(file) -> Iterator[tuple[np.ndarray, dict]]:
    """(fields [T, C, *grid] float32, metadata) per trajectory of an HDF5 file (path or file object)."""
    import h5py

    try:
        f = h5py.File(file, "r")
    except Exception as e:  # OSError: not HDF5, truncated superblock
        raise HDF5LayoutError(f"not a readable HDF5 file: {type(e).__name__}: {e}") from e
    with f:
        layout = layout_of(f)
        reader = {"the_well": _the_well, "pdebench": _pdebench, "pdebench_groups": _pdebench_groups}[layout]
        try:
            yield from reader(f)
        except HDF5LayoutError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:  # truncated data blocks, odd attributes
            raise HDF5LayoutError(f"{layout} layout: {type(e).__name__}: {e}") from e


def write_pdebench(path, fields, channel_names, grid_spacing, time_step: float, parameters: dict | None = None) -> None:
    """fields [N, T, C, *grid] -> PDEBench layout: one dataset per channel [N, T, *grid] plus coordinates."""
    import h5py

    a = np.asarray(fields, dtype=np.float32)
    dims = a.ndim - 3
    if not 1 <= dims <= 3 or a.shape[2] != len(channel_names) or len(grid_spacing) != dims:
        raise ValueError(f"write_pdebench: fields must be [N, T, C, *grid] with C = {len(channel_names)} channel "
                         f"names and one grid spacing per spatial axis, got {a.shape} and {len(grid_spacing)} spacings")
    with h5py.File(path, "w") as f:
        for c, name in enumerate(channel_names):
            f.create_dataset(name, data=a[:, :, c], compression="gzip")
        for ax in range(dims):
            f.create_dataset(_COORDS[ax], data=(np.arange(a.shape[3 + ax]) + 0.5) * grid_spacing[ax])
        f.create_dataset("t-coordinate", data=np.arange(a.shape[1]) * float(time_step))
        f.attrs["channel_names"] = list(channel_names)  # the channel order; datasets themselves list by name
        for k, v in (parameters or {}).items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                f.attrs[k] = v
