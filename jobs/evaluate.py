"""Evaluate a trained model: ``python jobs/evaluate.py --model RUN [--out DIR] [section.key=value ...]``.

Embeds a split (by default the model's own val split; ``data.*`` overrides point at other
shards, local or ``s3://``) with Ray Data, prints recall@1/5/10 both ways (instance and class
level), rsum, mean and median ranks and zero-shot accuracy, and writes an HTML report with the
run's training curves, where its step time went (a stacked bar per epoch), a recall@K chart and
the top results of a few queries (PNG files too). A model trained with ``run.trackers: [mlflow]``
gets the report added to its MLflow run (``evaluation/<split>``).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, checkpoint folder or run folder (local or s3://)")
    parser.add_argument("--out", default="report", help="folder for report.html, metrics.json and the PNGs (default: %(default)s)")
    parser.add_argument("--split", choices=["val", "train", "test"], default="val",
                        help="test: the test split beside val/ (a Karpathy import's)")
    parser.add_argument("--protocol", choices=["whole", "1k"], default="whole",
                        help="1k: metrics averaged over the 1K-image folds of the split's folds.json (COCO 1K test); "
                             "whole: over the whole split (COCO 5K test)")
    parser.add_argument("--examples", type=int, default=4, help="example queries shown per direction")
    parser.add_argument("--top-k", type=int, default=8, help="results shown per example query")
    parser.add_argument("--gpu", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the model's config, e.g. data.val_path=…")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from vcl_dist.retrieval.html_report import evaluate_folds, evaluate_table, write_report
    from vcl_dist.retrieval.pipeline import load_model_and_config, plan_embedding
    from vcl_dist.runtime.tables import print_metrics

    if args.examples < 0 or args.top_k < 1:
        raise ValueError("--examples must not be negative and --top-k must be positive")
    model, cfg = load_model_and_config(args.model, args.overrides)
    gpu = {"auto": "auto", "true": True, "false": False}[args.gpu]
    job = plan_embedding(args.model, model, cfg, args.split, use_gpu=gpu)
    table = pa.concat_tables(list(job.dataset.iter_batches(batch_format="pyarrow", batch_size=None)))
    if table.num_rows == 0:
        raise ValueError(f"no usable rows in {job.split_path}")
    if args.protocol == "1k":
        from vcl_dist.data.karpathy import FOLDS_FILE, read_folds
        from vcl_dist.storage import read_text

        try:
            folds = read_folds(read_text(job.source.filesystem, f"{job.split_path}/{FOLDS_FILE}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"--protocol 1k: no {FOLDS_FILE} in {job.split_path} (a Karpathy import writes it "
                                    "for the test split)") from None
        metrics = evaluate_folds(model, table, folds, job.class_names, cfg.eval.recall_ks, cfg.eval.templates)
    else:
        metrics = evaluate_table(model, table, job.class_names, cfg.eval.recall_ks, cfg.eval.templates)
    metrics["bad_rows"] = float(job.input_rows - table.num_rows)
    page = write_report(args.out, model=model, table=table, metrics=metrics, history=model.history,
                        title=f"vcl-dist evaluation: {args.model} ({args.split})", ks=cfg.eval.recall_ks,
                        examples=args.examples, top_k=args.top_k)
    print_metrics(metrics, title=f"{args.split} split, {table.num_rows} rows")
    print(f"report: {page}")
    from vcl_dist.tracking.mlflow_log import log_report

    run_id = log_report(cfg, args.out, f"evaluation/{args.split}")
    if run_id:
        print(f"report added to MLflow run {run_id} (artifacts: evaluation/{args.split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
