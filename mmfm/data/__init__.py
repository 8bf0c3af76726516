"""Sharded multimodal webdatasets: schema, writers, readers, pipelines, mixtures, selection.

See docs/data.md. Modules:
  schema     modalities, fields, metadata, safe keys        codecs   bytes <-> values, checks
  writer     SampleShardWriter (atomic, checked)             tario    tolerant tar reading
  shards     shard specs -> URLs                             build    `mmfm data build`
  verify     `mmfm data verify`                              commands the `mmfm data` argument parsers
  pipeline   the reader stages (small generators)            dataset  ShardDataset, ShardLoader (state, resume)
  baddata    bad-data counting, logging, threshold           synthetic tiny samples for tests and benchmarks
  sources    build inputs: folders, manifests, Parquet,      video    PyAV: probe, seeking frame sampling, MP4
             other tools' webdatasets                        audio    soundfile / PyAV decode
  images     Pillow decode, normalised to 8-bit upright      hdf5     h5py: PDEBench and The Well layouts
  demo/      `mmfm data demo` generators                     physics/ heat, Burgers, Navier-Stokes solvers
  select     `mmfm data select` (DSIR)
"""
from mmfm.data.schema import MODALITIES, SchemaError, check_key, safe_join  # noqa: F401
from mmfm.data.writer import SampleShardWriter  # noqa: F401
