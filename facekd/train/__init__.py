"""facekd.train"""
