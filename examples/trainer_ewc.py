from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from forgetkit.integrations import RegularizedSFTTrainer, fisher_batches, mix_replay
from forgetkit.regularizers import EWC

model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
model = AutoModelForCausalLM.from_pretrained(model_name)
tokenizer = AutoTokenizer.from_pretrained(model_name)
dataset = load_dataset("HuggingFaceTB/smoltalk", "everyday-conversations")
train_dataset = dataset["train"].select_columns(["messages"])

# forgetkit: the general chat data whose abilities must not be forgotten
general = load_dataset("HuggingFaceTB/smoltalk", "smol-magpie-ultra", split="train[:2000]")
general = general.select_columns(["messages"])
ewc = EWC(  # EWC: a pull toward the base weights, weighted by their Fisher on `general`
    lam=100.0,
    batches=fisher_batches(general, tokenizer, format="chat", max_length=512, examples=256),
    postprocess="max_normalize",
)
train_dataset = mix_replay(train_dataset, general, ratio=0.1, seed=0)  # replay: 10% general

args = SFTConfig(
    output_dir="./sft_output",
    num_train_epochs=1,
    per_device_train_batch_size=4,
    learning_rate=5e-5,
    logging_steps=10,
    report_to="tensorboard",
)
trainer = RegularizedSFTTrainer(  # forgetkit: instead of trl's SFTTrainer
    model=model,
    args=args,
    train_dataset=train_dataset,
    processing_class=tokenizer,
    regularizers=[ewc],
)
trainer.train()
