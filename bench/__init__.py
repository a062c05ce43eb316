"""mixem.bench"""
