"""facekd.evaluate"""
