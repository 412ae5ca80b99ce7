"""Training building blocks: stages, LoRA, the collator, FSDP2 sharding and the train loop."""
