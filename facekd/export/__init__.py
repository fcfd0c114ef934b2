"""facekd.export"""
