"""mixem.cli"""
