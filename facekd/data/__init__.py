"""facekd.data"""
