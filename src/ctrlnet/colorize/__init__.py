"""colorize"""
