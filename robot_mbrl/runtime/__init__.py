"""robot_mbrl.runtime"""
