"""Converters from public datasets to vlp's formats (training shards, CLIP_benchmark layouts).

Each module is a script (`python -m data_tools.<name> --help`) built on `vlp.data`; none
downloads anything: they convert files you already have.
"""
