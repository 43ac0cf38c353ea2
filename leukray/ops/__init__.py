"""Pure numpy/cv2 operations on images: decoding, Otsu preprocessing, augmentation and
leukocyte detection in smear fields, and the allocator setting of the processes that run
them (`allocator`). No Ray, no torch: testable with numpy alone.

May import: numpy, cv2, scipy, `leukray.config`.
"""
