"""The one engine every family runs through: configuration from recipes, training loop, evaluation, prediction, optimizer, runs, warm start, selector, model statistics."""
