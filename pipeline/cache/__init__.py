"""The HDF5 feature cache: its name, writer and validating reader, and the provenance every reader checks.

What other stages use:
    feature_cache.FeatureCache, read_info, open_h5, newest_cache, list_caches   reading caches
    feature_cache.read_int8_observers   the int8 network's calibration, for rebuilding it
    feature_cache.CacheWriter, cache_file_name, fingerprint                      writing them
    handle.Cache            the Python API's handle on one cache file (pipeline.Cache)
    provenance.Provenance   backbone, weights, preprocessing, classes: where rows come from, and what fits together
    feature_cache.ConsolidateResult   caches --consolidate's answer (exported here)
"""

#: the stages' result dataclasses -> their modules, loaded on first use (as the other stages' packages do)
RESULTS = {"ConsolidateResult": "feature_cache"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
