rule data:
    """CIFAR-10 as uint8 tensors with the validation split and provenance."""
    conda:
        "../envs/pipeline.yaml"
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
