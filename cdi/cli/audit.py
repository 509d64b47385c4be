"""`cdi audit`: was this image set used to train this model? Options, the call into `cdi.audit.audit`, the output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdi.cli.common import (add_access_option, add_compute_options, add_format_option, add_progress_option,
                            add_reference_option, add_tracking_options, check_output_path, set_threads, write_output)
from cdi.options import comma_list, count, positive_int

NAME, HELP = "audit", "audit a model for use of a suspect image set"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from cdi.features import FEATURE_NAMES, GRAY_BOX_FEATURES  # the families declare them
    from cdi.stats.difficulty import DIFFICULTY_CHOICES
    from cdi.tracking import audit as audit_layout

    audit = commands.add_parser(NAME, help=HELP)
    audit.set_defaults(run=run)
    audit.add_argument("--model", required=True, help="diffusers pipeline directory (save_pretrained output)")
    audit.add_argument("--suspect", required=True, help="folder of published images P (suspected used)")
    audit.add_argument("--control", required=True, help="folder of unpublished images U, same distribution")
    audit.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    add_access_option(audit)
    audit.add_argument("--features", type=comma_list, default=None,
                       help="comma-separated subset of feature names (default: all for the access level): "
                            f"gray {','.join(GRAY_BOX_FEATURES)}; white also "
                            f"{','.join(n for n in FEATURE_NAMES if n not in GRAY_BOX_FEATURES)}")
    audit.add_argument("--test", choices=("permutation", "welch"), default="permutation",
                       help="permutation (exact, default) or welch (the paper's protocol; anti-conservative)")
    audit.add_argument("--permutations", type=positive_int, default=1000,
                       help="label permutations of the permutation test (default 1000)")
    audit.add_argument("--power-resamples", type=count, default=100,
                       help="resamples per set size for the power curve (default 100; 0 skips it)")
    audit.add_argument("--seed", type=count, default=0, help="seed of noise draws and folds (default 0)")
    audit.add_argument("--folds", type=count, default=5, help="cross-fitting folds (default 5)")
    add_compute_options(audit, batch_size=16)
    audit.add_argument("--devices", type=positive_int, default=1, help="devices per node (Lightning), default 1")
    audit.add_argument("--num-nodes", type=positive_int, default=1, help="nodes (Lightning), default 1; every node must join within "
                       "$CDI_RENDEZVOUS_TIMEOUT seconds (default 300)")
    audit.add_argument("--strategy", default="auto",
                       help="Lightning strategy; default ddp_spawn when several devices, else single device")
    audit.add_argument("--precision", choices=("auto", "32", "bf16", "16"), default="auto",
                       help="autocast precision (auto: bf16 on CUDA where supported, else 16; 32 on CPU, where "
                            "bf16 is ~1.5x faster on CPUs with AVX512-BF16/AMX); features are kept in float32 "
                            "and cached per precision")
    audit.add_argument("--timestep-batching", choices=("auto", "on", "off"), default="auto",
                       help="make each feature family's model calls at several timesteps or draws of a batch as "
                            "fewer, larger calls (auto: on in bf16 on CPU, off in float32, whose features it "
                            "changes in the last bits, ~1e-6 relative; cached apart when on)")
    audit.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                       help="run the denoiser under torch.compile (auto: off, as measured on CPU, where its "
                            "warm-up of minutes outweighs a <10%% gain, and on CUDA until measured; on: compile, "
                            "or warn and run uncompiled where no compiler works; cached apart when on)")
    audit.add_argument("--cache-dir", default=None,
                       help="feature cache folder (default $CDI_CACHE_DIR, else ~/.cache/cdi/features)")
    audit.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    audit.add_argument("--allow-pickle", action="store_true",
                       help="allow pickle (.bin/.pt/.ckpt) weights; they can run code: only for trusted models")
    audit.add_argument("--prompt", default=None,
                       help="caption for every image without one in metadata.jsonl (text-to-image models)")
    audit.add_argument("--class-label", default=None,
                       help="class id or name for every image without a label in metadata.jsonl")
    audit.add_argument("--latent-sample-seed", type=count, default=None,
                       help="latent models: encode with a seeded VAE posterior sample (default: posterior mean)")
    add_tracking_options(audit, experiment=audit_layout.EXPERIMENT)
    audit.add_argument("--output", type=Path, default=None, help="write the result JSON to this file")
    audit.add_argument("--resume", default=None, metavar="RUN_ID",
                       help="finish an audit run that stopped (e.g. tracking server lost); features come from the cache")
    add_progress_option(audit)
    add_format_option(audit)
    add_reference_option(audit, "a model not trained on the suspect images (e.g. the base model of a fine-tune), "
                                "queried with the same seeded noise to remove per-image difficulty; may be given "
                                "more than once")
    audit.add_argument("--lora", type=Path, default=None, metavar="FILE",
                       help="LoRA weights (.safetensors) applied to --model: the audited model is base + LoRA, and "
                            "the base is the reference model unless --reference-model is given")
    audit.add_argument("--representation", choices=("raw", "calibrated", "both"), default="calibrated",
                       help="with reference models: score the calibrated features (default), the raw ones, or both")
    audit.add_argument("--reference-formula", choices=("difference", "log_ratio"), default="difference",
                       help="calibrated feature: target minus mean reference (default) or log ratio")
    audit.add_argument("--difficulty-calibration", choices=DIFFICULTY_CHOICES, default=None,
                       help="regress the features on label-free image statistics (image), also on the top "
                            "principal components of the pooled images' pixels (image+pca), also on the loss of "
                            "the images' Wiener denoiser under DL's seeded noise (image+pca+wiener, pixel models), "
                            "and score the residuals; or not (off); default auto: image+pca+wiener on pixel "
                            "models, off on latent ones (see README)")
    audit.add_argument("--duplicates", choices=("refuse", "keep-one"), default="refuse",
                       help="a picture found more than once (same file, or re-encoded, resized, lightly edited): "
                            "refuse the audit (default) or keep one copy per set; a picture in both sets is refused")
    chosen = audit.add_mutually_exclusive_group()
    chosen.add_argument("--config", type=Path, default=None,
                        help="best_config.yaml of a search: its features, access, folds and seed replace those options")
    chosen.add_argument("--from-search", default=None, metavar="RUN_ID",
                        help="as --config, with the best_config.yaml downloaded from this search run")
    return audit


def run(args: argparse.Namespace) -> int:
    from cdi.audit import audit
    from cdi.features.extraction import ExtractionOptions

    check_output_path(args.output)
    set_threads(args.threads)
    search_config = search_config_of(args)  # audit() applies it whole: features, access, folds, seed, scorer, ...
    result = audit(
        args.model,
        args.suspect,
        args.control,
        alpha=args.alpha,
        access=args.access,
        features=args.features,
        seed=args.seed,
        folds=args.folds,
        allow_pickle=args.allow_pickle,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        extraction=ExtractionOptions(
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            devices=args.devices,
            num_nodes=args.num_nodes,
            strategy=args.strategy,
            precision=args.precision,
            timestep_batching=args.timestep_batching,
            compile=args.compile,
            threads=args.threads or None,  # also inside Lightning's DDP processes, which pick their own count
        ),
        prompt=args.prompt,
        class_label=args.class_label,
        latent_sample_seed=args.latent_sample_seed,
        resume_run_id=args.resume,
        test=args.test,
        n_permutations=args.permutations,
        power_resamples=args.power_resamples,
        search_config=search_config,
        reference_models=args.reference_models,
        lora=args.lora,
        representation=args.representation,
        reference_formula=args.reference_formula,
        difficulty_calibration=args.difficulty_calibration,
        duplicates=args.duplicates,
    )
    if result is None:
        if args.output_format != "json":
            print("features of this rank are in the cache; rank 0 reports the audit")
        return 0
    from cdi import tracking

    record = tracking.redact_value(result.to_dict(), tracking.resolve_tracking_uri(args.tracking_uri))
    if args.output_format == "json":  # the result JSON (docs/result.schema.json) and nothing else on stdout
        if args.output is not None:
            write_output(args.output, json.dumps(record, indent=2, sort_keys=True) + "\n", result.run_id)
        print(json.dumps(record, sort_keys=True, allow_nan=False))
        return 0
    print_result(result)
    if args.output is not None:
        write_output(args.output, json.dumps(record, indent=2, sort_keys=True) + "\n", result.run_id)
        print(f"result: {args.output}")
    return 0


def print_result(result) -> None:
    """The audit's text output: the verdict first, then what was audited and where the run is."""
    comparison = "<" if result.verdict == "used" else ">="
    print(f"verdict: {result.verdict} (p = {result.p_value:.3g} {comparison} alpha = {result.alpha})")
    print(f"suspect: {result.n_suspect} images, control: {result.n_control} images, access: {result.access}, "
          f"test: {result.test}")
    for reference in result.extras.get("reference_models", []):
        role = " (the base of --lora)" if reference.get("base_of_lora") else ""
        print(f"reference model{role}: {reference['path']} (fingerprint {reference['fingerprint'][:12]})")
    calibration = result.extras.get("calibration") or {}
    if calibration.get("representation", "raw") != "raw" or calibration.get("difficulty_calibration", "off") != "off":
        print(f"calibration: representation {calibration['representation']}"
              + (f" ({calibration['reference_formula']})" if calibration.get("reference_formula") else "")
              + f", difficulty {calibration['difficulty_calibration']}")
    held_out = result.extras.get("excluded_calibration_images")
    if held_out:
        print(f"left out: {held_out['suspect']} suspect and {held_out['control']} control images held out as "
              f"calibration data of search run {held_out['search_run_id']}")
    for warning in result.extras.get("warnings", []):
        print(f"WARNING: {warning}")
    print(f"run: {result.run_id} (tracking URI {result.tracking_uri}, experiment {result.experiment})")
    for dropped in result.extras.get("duplicates_dropped", []):
        print(f"left out (duplicate): {dropped['set']} {dropped['path']}")


def search_config_of(args: argparse.Namespace):
    """The search result named by --config or --from-search, or None."""
    from cdi.search import SearchConfig, download_config

    if args.config is not None:
        return SearchConfig.read(args.config)
    if args.from_search:
        from cdi import tracking

        return download_config(args.from_search, tracking.resolve_tracking_uri(args.tracking_uri))
    return None
