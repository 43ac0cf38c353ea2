"""Pure numpy/cv2 operations on images: decoding, Otsu preprocessing, augmentation and
leukocyte detection in smear fields. No Ray, no torch: testable with numpy alone.

May import: numpy, cv2, scipy, `leukray.config`.
"""
