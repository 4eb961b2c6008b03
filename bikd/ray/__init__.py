"""Ray layer: thin actors that unpack small versioned messages and call bikd's pure-torch functions."""


def require_resources(name: str, resources: dict[str, float], count: int) -> None:
    """ValueError unless the Ray cluster (initialised) has ``count`` x each custom resource of ``resources``:
    actors asking for a resource that no node offers would wait forever instead of failing."""
    import ray

    have = ray.cluster_resources()
    for key, amount in resources.items():
        if amount * count > have.get(key, 0):
            raise ValueError(f"{name} {key}: {amount:g} x {count}; the Ray cluster has {have.get(key, 0):g} of {key!r} "
                             f"(start the nodes with ray start --resources='{{\"{key}\": ...}}')")
