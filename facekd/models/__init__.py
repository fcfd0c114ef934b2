"""facekd.models"""
