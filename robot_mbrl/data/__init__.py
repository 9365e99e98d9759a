"""robot_mbrl.data"""
