"""mergekit's YAML schema on mergeops: parsing, per-tensor planning, tokenizer and layer naming.

``schema`` parses a mergekit 0.1.5 config, ``gradients`` resolves parameter gradients and
``filter:`` lists, ``architecture`` names layers, ``plan`` turns a config into per-tensor routes
for the engine, ``tokenizer``/``vocab_rows`` build the output vocabulary. See docs/mergekit.md.
"""
