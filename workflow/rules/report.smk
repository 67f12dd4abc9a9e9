# The last stages: the paper's tables and figures from every run's metrics
# files, and REPORT.md. Outputs marked report() go into `snakemake --report`.

from pipeline_src.paths import REPORT_FIGURES as FIGURES, REPORT_TABLES as TABLES

# Every certified method's params block (the benchmark may time any; the report checks runs against them).
METHOD_BLOCKS = list(METHOD_FACTS)


# Table 3 measured on one device beside the floor, when `benchmark.enabled`.
BENCHMARK_OUTPUTS = benchmark_outputs(P) if P["benchmark"]["enabled"] else []


if P["benchmark"]["enabled"]:

    rule timing:
        """Seconds per epoch and peak memory of every method beside the floor (the benchmark)."""
        conda:
            "../envs/pipeline.yaml"
        input:
            code=CODE["benchmark"],
            cache=LAYOUT.data_cache,
            vanilla=LAYOUT.vanilla_model,
            factors=LAYOUT.svd_factors,
        output:
            BENCHMARK_OUTPUTS,
        params:
            **{name: P[name] for name in ("run", "model", "methods", "benchmark", *METHOD_BLOCKS)},
        log:
            LAYOUT.log("benchmark"),
        benchmark:
            LAYOUT.benchmark("benchmark")
        resources:
            gpu=1,
            gpu_jobs=1,
            mem_mb=16000,
            runtime=30,
        shell:
            stage_command("benchmark")


# The params that decide which runs exist and what the tables check them against.
REPORT_PARAMS = dict(run=P["run"], methods=P["methods"], seeds=P["seeds"], model=P["model"],
                     benchmark=P["benchmark"],
                     certify=P["certify"], pgd=P["pgd"], **{name: P[name] for name in METHOD_BLOCKS},
                     vanilla=P["vanilla"],
                     **({"similarity": P["similarity"]} if "similarity" in P else {}),
                     **({"timed_runs": P["timed_runs"]} if P.get("timed_runs") is not None else {}))


rule tables:
    """Tables 1-3 (Markdown, CSV, LaTeX) beside the paper's numbers."""
    conda:
        "../envs/pipeline.yaml"
    input:
        unpack(run_metrics),
        code=CODE["tables"],
    output:
        md=[LAYOUT.table(n, "md") for n in TABLES],
        # The report shows each table as REPORT.md does (trimmed, with its notes); the CSV
        # keeps every column.
        html=[report(LAYOUT.table(n, "html"), caption=f"../report/table{n}.rst", category="Tables",
                     labels={"table": f"Table {n}"})
              for n in TABLES],
        csv=[LAYOUT.table(n, "csv") for n in TABLES],
        tex=[LAYOUT.table(n, "tex") for n in TABLES],
        # One small metrics file per row for DVC (`dvc metrics show results/<run>/summary`).
        summary=[LAYOUT.summary(group) for group in dict.fromkeys(run.group for run in RUNS.values())],
    params:
        **REPORT_PARAMS,
    log:
        LAYOUT.log("tables"),
    benchmark:
        LAYOUT.benchmark("tables")
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        stage_command("tables")


rule figures:
    """Figures 2 and 3, the certified-radius curve and per-layer similarity (PNG, PDF)."""
    conda:
        "../envs/pipeline.yaml"
    input:
        unpack(run_metrics),
        code=CODE["figures"],
    output:
        png=[report(LAYOUT.figure(name, "png"), caption=f"../report/{name}.rst", category="Figures",
                    labels={"figure": name})
             for name in FIGURES],
        pdf=[LAYOUT.figure(name, "pdf") for name in FIGURES],
    params:
        **REPORT_PARAMS,
    log:
        LAYOUT.log("figures"),
    benchmark:
        LAYOUT.benchmark("figures")
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        stage_command("figures")


rule report:
    """REPORT.md: provenance, schedules, the three tables and the figures."""
    conda:
        "../envs/pipeline.yaml"
    input:
        unpack(run_metrics),
        code=CODE["report"],
        tables=rules.tables.output.md,
        figures=rules.figures.output.png,
    output:
        md=LAYOUT.report,
        html=report(LAYOUT.report_html, caption="../report/REPORT.rst", category="Report"),
    params:
        **REPORT_PARAMS,
    log:
        LAYOUT.log("report"),
    benchmark:
        LAYOUT.benchmark("report")
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        stage_command("report")
