def data_source(wildcards):
    """What the data stage reads, as an input of the rule (a dependency under DVC too):
    replacing the archive or folder at the same path reruns the stage. The committed
    sample for `sample`, `data.path` for `images`; nothing for `torchvision`, whose
    download torchvision checks itself (and which may not exist before the first run)."""
    import os

    import pipeline_src
    from pipeline_src.data.cifar import SAMPLE_ARCHIVE

    data = P["data"]
    if data["source"] == "sample":
        # The archive's place in this project, whichever project pipeline_src came from.
        return [SAMPLE_ARCHIVE.relative_to(Path(pipeline_src.__file__).resolve().parent.parent).as_posix()]
    if data["source"] == "images" and data["path"]:
        return [os.path.expanduser(data["path"])]
    return []


rule data:
    """CIFAR-10 as uint8 tensors with the validation split and provenance."""
    input:
        code=CODE["data"],
        source=data_source,
    output:
        cache=LAYOUT.data_cache,
        provenance=LAYOUT.data_provenance,
    params:
        data=P["data"],
    log:
        LAYOUT.log("data"),
    benchmark:
        LAYOUT.benchmark("data")
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        stage_command("data")
