"""robot_mbrl.safety"""
