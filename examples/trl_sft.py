"""Fine-tune an MoE model with moefuse experts in your own TRL script.

This is TRL's usual SFT script; moefuse changes two things: the model class (experts on moefuse; it also reads
fused checkpoints) and a callback that logs tokens/s and MFU. LoRA targets name the experts' projections
(gate_proj, up_proj, down_proj) as for any model: after `import moefuse`, PEFT puts per-expert LoRA on them.

    python examples/trl_sft.py --model_name_or_path Qwen/Qwen3-30B-A3B --dtype bfloat16 \
        --dataset_name trl-lib/Capybara --use_peft --lora_r 16 --lora_alpha 32 \
        --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --learning_rate 1e-4 \
        --max_length 2048 --output_dir qwen3-moe-lora

    accelerate launch --config_file examples/accelerate/multi_gpu_ddp.yaml examples/trl_sft.py ...

--dataset_name also takes a local .json/.jsonl/.parquet file.
"""

from pathlib import Path

from datasets import load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

import moefuse
from moefuse.train import add_throughput_callback


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    model = moefuse.Qwen3MoeFusedForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=model_args.dtype or "auto",
        attn_implementation=model_args.attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    local = Path(script_args.dataset_name)
    if local.is_file():
        builder = "json" if local.suffix in (".json", ".jsonl") else local.suffix.lstrip(".")
        dataset = load_dataset(builder, data_files=str(local), split="train")
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
        )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    add_throughput_callback(trainer)
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
