"""A request's inputs, checked before any model runs: images (`images`), prompts and their token ids
(`tokenizer`), background categories (`categories`), and example inputs for demos (`examples`)."""
