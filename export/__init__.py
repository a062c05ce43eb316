"""mixem.export"""
