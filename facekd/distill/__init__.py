"""facekd.distill"""
