"""Training data for ``moefuse train``: loaded with Hugging Face ``datasets`` and put in a form TRL's
``SFTTrainer`` reads (``messages``, ``prompt``/``completion`` or a text column).

Row formats accepted: ``messages`` (OpenAI roles), ShareGPT ``conversations`` (``from``/``value``), Alpaca
(``instruction``, optional ``input`` and ``system``, ``output``), ``prompt``/``completion``, and plain text in
``dataset_text_field``. ShareGPT and Alpaca rows become ``messages``.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .builtin import BUILTIN_DATASET, DATASET
from .config import MoefuseTrainArguments, TrainConfigError

# datasets' packaged builders by file suffix
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise TrainConfigError(
                f"dataset: {path} has suffix '{path.suffix}'; give one of {', '.join(BUILDERS)}"
            )
        return BUILDERS[path.suffix], [str(path)]
    by_builder: dict[str, list[str]] = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in BUILDERS:
            by_builder.setdefault(BUILDERS[file.suffix], []).append(str(file))
    if len(by_builder) != 1:
        found = "no data files" if not by_builder else f"files of several kinds ({', '.join(by_builder)})"
        raise TrainConfigError(
            f"dataset: the folder {path} holds {found}; put .json/.jsonl/.parquet/.csv files of one kind in it"
        )
    return next(iter(by_builder.items()))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in BUILDERS


def load_raw_dataset(args: MoefuseTrainArguments) -> Dataset:
    """The dataset ``args.dataset`` names, as it is stored (one split)."""
    path = DATASET if args.dataset == BUILTIN_DATASET else Path(args.dataset).expanduser()
    if path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists():
        dataset = load_from_disk(str(path))  # written by Dataset.save_to_disk
    elif path.exists():
        builder, data_files = _local_files(path)
        dataset = load_dataset(builder, data_files=data_files, split="train")
    elif _looks_like_path(args.dataset):
        raise TrainConfigError(f"dataset: {args.dataset}: no such file or folder")
    else:
        try:
            dataset = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        except Exception as e:  # offline, unknown name, unknown split: all reported the same way
            raise TrainConfigError(
                f"dataset: could not load '{args.dataset}' from the Hugging Face Hub ({type(e).__name__}: {e}); "
                "give a local .json/.jsonl/.parquet file, or check the name and the network"
            ) from e
    if isinstance(dataset, DatasetDict):
        if args.dataset_split not in dataset:
            raise TrainConfigError(
                f"dataset: {args.dataset} has splits {', '.join(dataset)}, not '{args.dataset_split}'; "
                "set dataset_split"
            )
        dataset = dataset[args.dataset_split]
    return dataset


def _sharegpt_to_messages(row: dict) -> dict:
    messages = []
    for turn in row["conversations"]:
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise TrainConfigError(
                f"dataset: ShareGPT turn from '{turn['from']}'; expected one of {', '.join(_SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


def _alpaca_to_messages(row: dict) -> dict:
    prompt = row["instruction"]
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return {"messages": messages}


def to_sft_format(dataset: Dataset, text_field: str, where: str) -> Dataset:
    """``dataset`` in a form SFTTrainer reads; raises :class:`TrainConfigError` naming the columns otherwise."""
    columns = set(dataset.column_names)
    if "messages" in columns or {"prompt", "completion"} <= columns or text_field in columns:
        return dataset
    if "conversations" in columns:
        return dataset.map(_sharegpt_to_messages, remove_columns=dataset.column_names)
    if {"instruction", "output"} <= columns:
        return dataset.map(_alpaca_to_messages, remove_columns=dataset.column_names)
    raise TrainConfigError(
        f"dataset: {where} has columns {', '.join(sorted(columns))}; expected 'messages', ShareGPT "
        f"'conversations', Alpaca 'instruction'/'output', 'prompt'/'completion', or a '{text_field}' column "
        "(dataset_text_field)"
    )


def is_conversational(dataset: Dataset) -> bool:
    if "messages" in dataset.column_names:
        return True
    return "prompt" in dataset.column_names and isinstance(dataset[0]["prompt"], list)


def load_train_dataset(
    args: MoefuseTrainArguments, text_field: str, seed: int
) -> tuple[Dataset, Dataset | None]:
    """``(train, eval)``: the rows of ``args.dataset`` in SFT form, ``val_size`` of them held out for eval."""
    dataset = load_raw_dataset(args)
    if len(dataset) == 0:
        raise TrainConfigError(f"dataset: {args.dataset} has no rows")
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    dataset = to_sft_format(dataset, text_field, args.dataset)
    if not args.val_size:
        return dataset, None
    test_size = int(args.val_size) if args.val_size >= 1 else args.val_size
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]
