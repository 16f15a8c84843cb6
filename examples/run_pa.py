"""Shared offline paged-attention runner, with MindIE's ``run_pa.py`` flags.

    python -m examples.run_pa --model_path DIR --input_texts "What's deep learning?" --is_chat_model
"""
from atb_llm.runner.offline_runner import (  # noqa: F401 - re-exported: the shared runner's public names
    PARunner,
    base_parser,
    eos_token_ids,
    relaunch_under_torchrun,
    report_timings,
    sampling_from_args,
)
from atb_llm.utils.log import logger, print_log


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--is_chat_model", action="store_true")
    args = parser.parse_args()
    try:  # a bad flag or checkpoint is a one-line error, not a traceback
        sampling = sampling_from_args(args)
        runner = PARunner(**vars(args))
    except (ValueError, OSError, NotImplementedError) as error:
        parser.error(str(error))
    requests = runner.infer(args.input_texts, sampling, is_chat_model=args.is_chat_model)
    for i, request in enumerate(requests):
        print_log(runner.rank, logger.info, f"Question[{i}]: {args.input_texts[i]}")
        print_log(runner.rank, logger.info, f"Answer[{i}]: {request.error or request.text}")
    report_timings(requests, runner.last_run_seconds, runner.rank)


if __name__ == "__main__":
    main()
