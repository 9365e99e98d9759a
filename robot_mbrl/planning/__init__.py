"""robot_mbrl.planning"""
