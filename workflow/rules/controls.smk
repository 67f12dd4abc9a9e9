# Table 1's control rows, when `similarity.controls` is on: what a network
# unrelated to the vanilla model scores on the similarity measures. A second
# vanilla model, trained exactly like `vanilla` from seed run.seed +
# similarity.control_seed_offset, and the certified architecture at
# initialisation (as BCP builds it, from its own seed), each compared to the vanilla model with
# every measure of the similarity stage and given its Lipschitz product.

CONTROLS = control_outputs(P)  # {control: its similarity metrics file}; {} when off


if CONTROLS:

    rule vanilla_control:
        """A second vanilla model: the vanilla stage's recipe from another seed."""
        conda:
            "../envs/pipeline.yaml"
        input:
            code=CODE["vanilla_control"],
            cache=LAYOUT.data_cache,
        output:
            model=LAYOUT.vanilla_control("model.pt"),
            history=LAYOUT.vanilla_control("history.csv"),
            metrics=LAYOUT.vanilla_control("metrics.json"),
        params:
            run=P["run"],
            model=P["model"],
            vanilla=P["vanilla"],
            # Its metrics include the accuracy on the certified test subset (Table 2's vanilla row).
            certify__test_images=P["certify"]["test_images"],
            similarity=P["similarity"],
        log:
            LAYOUT.log("vanilla_control"),
        benchmark:
            LAYOUT.benchmark("vanilla_control")
        resources:
            gpu=1,
            gpu_jobs=1,
            mem_mb=16000,
            runtime=240,
        shell:
            stage_command("vanilla_control")

    rule similarity_control:
        """Table 1's control rows: the second vanilla model and the certified architecture at
        initialisation (its own seed), each against the vanilla model."""
        conda:
            "../envs/pipeline.yaml"
        input:
            code=CODE["similarity"],
            model=LAYOUT.vanilla_control("model.pt"),
            trained=LAYOUT.vanilla_control("metrics.json"),
            vanilla=LAYOUT.vanilla_model,
        output:
            **CONTROLS,
        params:
            run=P["run"],
            model=P["model"],
            bcp=P["bcp"],  # the random network is built as BCP builds its model (bcp.model)
            duet=P["duet"],
            certify=P["certify"],
            similarity=P["similarity"],
        log:
            LAYOUT.log("similarity_control"),
        benchmark:
            LAYOUT.benchmark("similarity_control")
        resources:
            mem_mb=8000,
            runtime=30,
        shell:
            stage_command("similarity_control")
