"""GGUF"""
