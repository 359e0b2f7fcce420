# placeholder, being written
ResNet = cifar_resnet = resnet18 = resnet34 = resnet50 = resnet101 = resnet152 = resnext50_32x4d = wide_resnet50_2 = None
