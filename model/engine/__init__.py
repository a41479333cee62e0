"""The one DeepSpeed training loop and what it needs (see trainer.py); task recipes are in model/tasks/."""
