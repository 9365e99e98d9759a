"""robot_mbrl.models"""
