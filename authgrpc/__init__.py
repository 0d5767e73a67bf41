"""authgrpc"""
