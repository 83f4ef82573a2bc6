"""Fine-tuning: device and precision, the loop, optimizer and schedule, checkpoints, data parallel,
several seeds as one batched model."""
