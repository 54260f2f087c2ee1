"""HF peft adapter folders (export, import, inspect) and merged transformers checkpoints. Each method
declares its own peft mapping (`AdapterMethod.peft_mapping`); nothing here names a method.
"""
